"""Protection keys under the software CPU's TLB-fill hook (accel/tcg/tlb_fill.c) with ``-cpu max``'s CPUID.

The hook applies CR4.PKE itself (PKRU read from the engine's ``env``): permitted accesses stay on the hook
(no fallback to Unicorn's MMU, so the dirty log and the code map keep seeing them), forbidden ones are
left to Unicorn's walk, which raises the #PF with the PK error-code bit. A grant made under one PKRU must
not survive a WRPKRU that forbids it (Unicorn's WRPKRU flushes the TLB).
"""

from __future__ import annotations

import pytest

from pyemu.system.cpu_options import CpuOptions
from pyemu.target.x86.cpu_models import TCG_WITHHELD_FEATURES
from pyemu.target.x86.cpuid import CpuidTable, default_cpuid
from pyemu.testing import GuestProgram, ProgramResult, describe, run_program
from pyemu.testing.environment import DATA, PT0
from pyemu.testing.handlers import exit_with
from pyemu.testing.runner import RunContext

OK = 0x600D
CR4_PKE = 1 << 22
PF = 14
KEY1 = 1 << 59
AD1, WD1 = 0b0100, 0b1000          # PKRU bits of key 1
ERR_P, ERR_W, ERR_U, ERR_PK = 1, 2, 4, 0x20
FAULTS = DATA + 0x100              # count, then error codes at +8 and CR2 values at +0x88
USER_RFLAGS = 0x3202               # IOPL=3 (the user program writes the exit port), IF=1


@pytest.fixture(autouse=True)
def _hook_enabled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYEMU_TCG_ENGINE_TLB", raising=False)


def _max_table() -> CpuidTable:
    """The CPUID a microvm under TCG presents with ``-cpu max`` (it offers pku)."""
    return CpuOptions("max").apply(default_cpuid().without(*TCG_WITHHELD_FEATURES), "tcg")


def _run(program: GuestProgram) -> tuple[ProgramResult, dict[str, int]]:
    vcpus: list = []

    def before_run(context: RunContext) -> None:
        vcpus.append(context.vcpu)

    result = run_program(program, "tcg", cpuid=_max_table(), timeout=60, before_run=before_run)
    assert result.exit_value == OK, describe(result)
    return result, vcpus[0].tlb_statistics


def _key1(page: str) -> str:
    """Put 0x1122334455667788 at ``page`` + 8, give its 4 KiB PTE (in pt0) protection key 1, set CR4.PKE
    and flush the TLB."""
    return f"""
        mov rbx, {page}
        mov rax, 0x1122334455667788
        mov [rbx + 8], rax
        mov rax, {page}
        shr rax, 12
        mov rbx, {KEY1}
        or qword ptr [{PT0} + rax * 8], rbx
        mov rax, cr4
        or rax, {CR4_PKE}
        mov cr4, rax
        mov rax, cr3
        mov cr3, rax
    """


def _wrpkru(value: int) -> str:
    return f"xor ecx, ecx\nxor edx, edx\nmov eax, {value:#x}\nwrpkru\n"


# #PF handler: records the error code and CR2, resumes at RCX (set before each faulting access).
_RESUME_AT_RCX = f"""
    mov rsi, {FAULTS}
    mov rax, [rsi]
    mov rdx, [rsp]
    mov [rsi + rax * 8 + 8], rdx
    mov rdx, cr2
    mov [rsi + rax * 8 + 0x88], rdx
    inc qword ptr [rsi]
    mov [rsp + 8], rcx
    add rsp, 8
    iretq
"""


def _faults(result: ProgramResult) -> list[tuple[int, int]]:
    """(error code, CR2) of each #PF, in order."""
    count = result.u64(FAULTS)
    return [(result.u64(FAULTS + 8 + 8 * i), result.u64(FAULTS + 0x88 + 8 * i)) for i in range(count)]


def test_permitted_accesses_with_pke_stay_on_the_hook() -> None:
    """CR4.PKE set, a key-1 user page: reads under WD, supervisor writes under WD with CR0.WP clear, and
    every access to key-0 pages are permitted -- and walked by the hook, with no fallback (the old hook
    left every fill under CR4.PKE to Unicorn)."""
    result, stats = _run(GuestProgram(f"""
        mov r15, data
        {_key1("keyed")}
        {_wrpkru(WD1)}
        mov rbx, keyed
        mov rax, [rbx + 8]            ; read: WD does not forbid it
        mov [r15 + 8], rax            ; key-0 page: written
        mov rax, cr0
        btr rax, 16                   ; CR0.WP
        mov cr0, rax
        mov qword ptr [rbx + 16], 0x77   ; supervisor write, CR0.WP=0: WD does not apply
        mov rax, [rbx + 16]
        mov [r15 + 16], rax
        mov rax, cr0
        bts rax, 16
        mov cr0, rax
        mov rax, cr4
        mov [r15 + 24], rax
        {exit_with(OK)}
    """, sections={"keyed": "ret"}, handlers={PF: exit_with(0xBAD)}))
    assert result.u64(DATA + 24) & CR4_PKE
    assert result.u64(DATA + 8) == 0x1122334455667788
    assert result.u64(DATA + 16) == 0x77
    assert stats["fills"] > 0
    assert stats["fallbacks"] == 0, stats


def test_user_accesses_follow_pkru_access_and_write_disable() -> None:
    """At CPL 3: a read granted under PKRU=0, then AD for key 1 -- the read faults (the grant did not
    survive WRPKRU), so does a write; a fetch from the key-1 page still runs; WD -- reads pass, writes
    fault; key-0 pages are never affected. Every fault is #PF with P|U and PK (and W for writes)."""
    result, stats = _run(GuestProgram(f"""
        {_key1("keyed")}
        mov rax, user_ds
        push rax
        mov rax, user_stack_top
        push rax
        push {USER_RFLAGS}
        mov rax, user_cs
        push rax
        mov rax, user
        push rax
        iretq
    """, sections={"keyed": "ret", "user": f"""
        mov r15, data
        mov rbx, keyed
        mov rax, [rbx + 8]            ; PKRU=0: granted (a TLB entry now maps the page readable)
        mov [r15 + 8], rax
        {_wrpkru(AD1)}
        mov rbx, keyed
        mov rcx, after_read
        mov rax, [rbx + 8]            ; AD: #PF
    after_read:
        mov rcx, after_write
        mov qword ptr [rbx + 8], 1    ; AD: #PF
    after_write:
        mov rax, keyed
        call rax                      ; fetches are not affected by keys
        mov qword ptr [r15 + 16], 0x55  ; key 0: fine
        {_wrpkru(WD1)}
        mov rbx, keyed
        mov rax, [rbx + 8]            ; WD: reads pass
        mov [r15 + 24], rax
        mov rcx, after_wd_write
        mov qword ptr [rbx + 8], 2    ; WD: #PF
    after_wd_write:
        {_wrpkru(0)}
        mov rbx, keyed
        mov qword ptr [rbx + 8], 3    ; no key restriction left
        mov rax, [rbx + 8]
        mov [r15 + 32], rax
        {exit_with(OK)}
    """}, handlers={PF: _RESUME_AT_RCX}))
    keyed = result.symbols["keyed"] + 8
    assert result.u64(DATA + 8) == 0x1122334455667788
    assert result.u64(DATA + 16) == 0x55
    assert result.u64(DATA + 24) == 0x1122334455667788
    assert result.u64(DATA + 32) == 3
    assert _faults(result) == [(ERR_P | ERR_U | ERR_PK, keyed), (ERR_P | ERR_W | ERR_U | ERR_PK, keyed),
                               (ERR_P | ERR_W | ERR_U | ERR_PK, keyed)]
    assert stats["fallbacks"] >= 3  # the faults themselves are left to Unicorn's walk


def test_supervisor_writes_follow_wd_under_cr0_wp_and_supervisor_pages_ignore_keys() -> None:
    """CPL 0: WD forbids a write to a key-1 user page when CR0.WP=1 (PK fault, no U bit); AD forbids a
    read; a supervisor page carrying key 1 is not affected by PKRU at all."""
    result, _stats = _run(GuestProgram(f"""
        mov r15, data
        {_key1("keyed")}
        mov rax, sup
        shr rax, 12
        mov rbx, {KEY1}
        lea rsi, [{PT0} + rax * 8]
        or qword ptr [rsi], rbx
        and qword ptr [rsi], -5       ; U/S clear: a supervisor page with key 1
        mov rax, cr3
        mov cr3, rax
        {_wrpkru(WD1)}
        mov rbx, keyed
        mov rcx, after_write
        mov qword ptr [rbx + 8], 1    ; WD, CR0.WP=1: #PF
    after_write:
        {_wrpkru(AD1)}
        mov rbx, keyed
        mov rcx, after_read
        mov rax, [rbx + 8]            ; AD: #PF
    after_read:
        mov rbx, sup
        mov qword ptr [rbx + 8], 9    ; supervisor page: keys do not apply
        mov rax, [rbx + 8]
        mov [r15 + 8], rax
        {exit_with(OK)}
    """, sections={"keyed": "ret", "sup": "ret"}, handlers={PF: _RESUME_AT_RCX}))
    keyed = result.symbols["keyed"] + 8
    assert result.u64(DATA + 8) == 9
    assert _faults(result) == [(ERR_P | ERR_W | ERR_PK, keyed), (ERR_P | ERR_PK, keyed)]


def _pkru_program(pkru: int) -> GuestProgram:
    """Sets XCR0 = x87|SSE, CR4.OSXSAVE|PKE and PKRU, stops (exit value 1), then reads XCR0 and PKRU back
    into data."""
    return GuestProgram(f"""
        mov r15, data
        mov rax, cr4
        or rax, {CR4_PKE | 1 << 18}
        mov cr4, rax
        mov eax, 3
        xor edx, edx
        xor ecx, ecx
        xsetbv
        {_wrpkru(pkru)}
        {exit_with(1)}
        jmp resume                    ; ends the block: the stop after the exit write comes before XGETBV
    resume:
        xor ecx, ecx
        xgetbv
        mov [r15], rax
        xor ecx, ecx
        rdpkru
        mov [r15 + 8], rax
        {exit_with(OK)}
    """)


def test_pkru_and_xcr0_travel_as_kvm_carries_them_and_back() -> None:
    """A TCG save carries XCR0 and PKRU in KVM's XSAVE layout (PKRU at 2688, XSTATE_BV bit 9); the same
    area, taken as a KVM vCPU's and converted for the software CPU, loads into a fresh engine whose RDPKRU
    and XGETBV give them back."""
    from pyemu.accel.kvm.state import XSAVE_AREA_SIZE, xsave_join, xsave_split
    from pyemu.hw.intc.lapic import LocalApic
    from pyemu.hw.intc.lapic_kvm_page import to_kvm
    from pyemu.migration.cross_accel import cpu_to_tcg
    from pyemu.system.timers import TimerQueue
    from pyemu.target.x86.cpuid import TSC_CRYSTAL_HZ
    from pyemu.testing import prepared

    pkru = 0x5C
    table = _max_table()
    with prepared(_pkru_program(pkru), "tcg", cpuid=table) as source:
        source.vcpu.run()
        state = source.vcpu.save_state()
        ram = source.board.memory.read(0, 0x200000)
    assert state.xsave is not None and state.xsave.xcr0 == 0x3 and state.xsave.pkru == pkru
    area = xsave_join(state.fpu, state.xsave, b"")
    assert len(area) == XSAVE_AREA_SIZE
    assert int.from_bytes(area[2688:2692], "little") == pkru
    assert int.from_bytes(area[512:520], "little") & (1 << 9)

    lapic = to_kvm(LocalApic(TimerQueue(clock=lambda: 0), apic_id=0, bsp=True).state(), crystal_hz=TSC_CRYSTAL_HZ,
                   bsp=True)
    as_kvm = state.copy()
    as_kvm.lapic, as_kvm.apic_base = lapic.page, lapic.apic_base
    as_kvm.fpu, as_kvm.xsave = xsave_split(area, 0x203)   # PKRU enabled in XCR0: no longer refused
    converted, _lapic = cpu_to_tcg(as_kvm, 0, TSC_CRYSTAL_HZ)
    assert converted.xsave is not None and (converted.xsave.xcr0, converted.xsave.pkru) == (0x203, pkru)
    # XCR0 = x87|SSE (not the engine's reset value 0x203), so the load below is seen
    as_kvm.fpu, as_kvm.xsave = xsave_split(area, 0x3)
    converted, _lapic = cpu_to_tcg(as_kvm, 0, TSC_CRYSTAL_HZ)
    with prepared(_pkru_program(0), "tcg", cpuid=table) as target:
        target.board.memory.write(0, ram)
        target.board.memory.write(DATA, bytes(16))
        target.vcpu.load_state(converted)
        target.vcpu.run()
        assert target.board.memory.read_u64(DATA) == 0x3
        assert target.board.memory.read_u64(DATA + 8) == pkru
