"""CPUID filtering for KVM vCPUs (pure functions: no /dev/kvm needed)."""

from __future__ import annotations

from pyemu.accel.kvm import abi
from pyemu.accel.kvm.cpuid import KVM_SIGNATURE, build_vcpu_cpuid, dropped_features
from pyemu.accel.kvm.system import CpuidEntry
from pyemu.target.x86.cpuid import default_cpuid

SSE3, SSE4_2, X2APIC, TSC_DEADLINE, HYPERVISOR = 1 << 0, 1 << 20, 1 << 21, 1 << 24, 1 << 31
FPU, APIC = 1 << 0, 1 << 9


def supported(overrides: dict | None = None) -> tuple[CpuidEntry, ...]:
    """A fake KVM_GET_SUPPORTED_CPUID: leaf 1 has only FPU/APIC/x2APIC and SSE3 (no SSE4.2, no hypervisor)."""
    base = {
        (1, 0): (0xA10F11, 0x800, SSE3 | X2APIC, FPU | APIC),
        (7, 0): (0, 0, 0, 0),
        (0x80000001, 0): (0, 0, 1, 1 << 29 | 1 << 20 | 1 << 11),
        (0x80000008, 0): (0x3030, 0, 0, 0),
        (0x40000000, 0): (0x40000001, 0x4B4D564B, 0x564B4D56, 0x4D),
        (0x40000001, 0): (0x1007EFB, 0, 0, 0),
        (0xD, 0): (7, 0x340, 0x340, 0),
    }
    base.update(overrides or {})
    flags = {7: abi.KVM_CPUID_FLAG_SIGNIFCANT_INDEX, 0xD: abi.KVM_CPUID_FLAG_SIGNIFCANT_INDEX}
    return tuple(CpuidEntry(l, s, flags.get(l, 0), *regs) for (l, s), regs in base.items())


def by_key(entries):
    return {(e.function, e.index): e for e in entries}


def test_feature_bits_are_the_intersection_plus_what_kvm_always_provides():
    table = default_cpuid().with_features("x2apic", "tsc_deadline").with_apic_id(3)
    entries = by_key(build_vcpu_cpuid(table, supported(), tsc_deadline=True))
    leaf1 = entries[(1, 0)]
    assert leaf1.ecx & SSE3 and leaf1.ecx & X2APIC
    assert not leaf1.ecx & SSE4_2  # pyemu asks for it, KVM lacks it
    assert leaf1.ecx & HYPERVISOR and leaf1.ecx & TSC_DEADLINE  # provided by KVM itself
    assert leaf1.edx == FPU | APIC
    assert leaf1.eax == table.lookup(1)[0]  # pyemu's family/model signature is kept
    assert leaf1.ebx >> 24 == 3  # APIC ID
    assert entries[(6, 0)].eax & (1 << 2)  # ARAT is always there with the in-kernel LAPIC timer


def test_tsc_deadline_needs_the_capability():
    table = default_cpuid().with_features("tsc_deadline")
    entries = by_key(build_vcpu_cpuid(table, supported(), tsc_deadline=False))
    assert not entries[(1, 0)].ecx & TSC_DEADLINE


def test_pyemu_leaves_survive_and_frequencies_follow_the_vm():
    table = default_cpuid()
    entries = by_key(build_vcpu_cpuid(table, supported(), tsc_khz=2_596_140, apic_bus_hz=25_000_000))
    assert entries[(0, 0)].regs == table.lookup(0)  # vendor and max leaf are pyemu's
    assert entries[(0x40000000, 0)].regs == table.lookup(0x40000000)
    eax, ebx, ecx, _ = entries[(0x15, 0)].regs
    assert ecx == 25_000_000 and ecx * ebx // eax == 2_596_140_000
    assert entries[(0x16, 0)].eax == 2596
    # 1 GHz bus (kernels without KVM_CAP_X86_APIC_BUS_CYCLES_NS): the crystal follows.
    eax, ebx, ecx, _ = by_key(build_vcpu_cpuid(table, supported(), tsc_khz=3_000_000, apic_bus_hz=10**9))[
        (0x15, 0)
    ].regs
    assert ecx == 10**9 and ecx * ebx // eax == 3_000_000_000


def test_address_sizes_never_exceed_the_host():
    table = default_cpuid()  # 40 physical / 48 virtual bits
    entries = by_key(build_vcpu_cpuid(table, supported()))
    assert entries[(0x80000008, 0)].eax & 0xFFFF == 0x3028  # min(40, 48) phys, min(48, 48) virt
    host39 = supported({(0x80000008, 0): (0x3027, 0, 0, 0)})
    assert by_key(build_vcpu_cpuid(table, host39))[(0x80000008, 0)].eax & 0xFF == 39


def test_kvmclock_leaves_sit_behind_pyemus_hypervisor_leaf():
    entries = by_key(build_vcpu_cpuid(default_cpuid(), supported(), kvmclock=True))
    sig = entries[(0x40000100, 0)]
    assert b"".join(r.to_bytes(4, "little") for r in (sig.ebx, sig.ecx, sig.edx)) == KVM_SIGNATURE
    assert sig.eax == 0x40000101
    features = entries[(0x40000101, 0)].eax
    assert features & (1 << 3) and features & (1 << 24)  # CLOCKSOURCE2, STABLE bit
    assert not features & (1 << 4)  # no async page faults offered
    assert (0x40000100, 0) not in by_key(build_vcpu_cpuid(default_cpuid(), supported(), kvmclock=False))


def test_xsave_leaves_only_with_xsave_and_flags_from_kvm():
    without = by_key(build_vcpu_cpuid(default_cpuid(), supported()))
    assert not any(leaf == 0xD for leaf, _ in without)
    table = default_cpuid().with_features("xsave")
    with_xsave = by_key(build_vcpu_cpuid(table, supported({(1, 0): (0, 0, 1 << 26, 0)})))
    assert with_xsave[(0xD, 0)].regs == (7, 0x340, 0x340, 0)
    assert with_xsave[(0xD, 0)].flags == abi.KVM_CPUID_FLAG_SIGNIFCANT_INDEX
    assert with_xsave[(0xB, 0)].flags == abi.KVM_CPUID_FLAG_SIGNIFCANT_INDEX  # indexed though KVM lacks it


def test_dropped_features_names_what_the_guest_will_miss():
    table = default_cpuid()
    assert {"sse4_2", "popcnt", "ssse3"} <= set(dropped_features(table, build_vcpu_cpuid(table, supported())))
    assert "sse3" not in dropped_features(table, build_vcpu_cpuid(table, supported()))
