"""The CPUID a KVM vCPU presents: pyemu's :class:`CpuidTable` filtered through what KVM supports.

Why filter instead of passing KVM_GET_SUPPORTED_CPUID through: the guest should see the same CPU model
under both accelerators (vendor, family, topology, the crystal/TSC leaves, pyemu's hypervisor leaf), so
pyemu's table is the starting point and KVM only removes feature bits the host cannot provide. Bits KVM
implements itself whatever the host has (the hypervisor bit, ARAT, TSC-deadline with the in-kernel LAPIC)
are allowed explicitly, as QEMU does.

Frequencies follow the real VM rather than the table: leaf 0x15/0x16 are rewritten from the vCPU's TSC
rate (KVM_GET_TSC_KHZ) and the in-kernel LAPIC bus, which Linux takes as the LAPIC timer rate. With
``kvmclock`` the KVM paravirtual leaves are added at 0x40000100, behind pyemu's own 0x40000000 leaf:
Linux scans every 0x100 for the "KVMKVMKVM" signature, so both stay visible.
"""

from __future__ import annotations

from pyemu.accel.kvm import abi
from pyemu.accel.kvm.system import CpuidEntry
from pyemu.target.x86.cpuid import FEATURE_SUBLEAF, FEATURES, CpuidTable

_REGS = ("eax", "ebx", "ecx", "edx")

# (leaf, subleaf) -> registers that are feature bitmaps: a bit survives only if KVM supports it too.
FEATURE_REGISTERS: dict[tuple[int, int], tuple[str, ...]] = {
    (1, 0): ("ecx", "edx"),
    (6, 0): ("eax",),
    (7, 0): ("ebx", "ecx", "edx"),
    (7, 1): ("eax",),
    (0xD, 1): ("eax",),
    (0x80000001, 0): ("ecx", "edx"),
    (0x80000007, 0): ("edx",),
}

# Bits KVM provides regardless of the host CPU (QEMU adds the same ones).
_ALWAYS_ALLOWED: dict[tuple[int, int, str], int] = {
    (1, 0, "ecx"): 1 << 31,  # hypervisor present
    (6, 0, "eax"): 1 << 2,  # ARAT: the in-kernel LAPIC timer keeps running in deep C-states
}
_TSC_DEADLINE_BIT = 1 << 24  # leaf 1 ECX

# Leaves whose answer depends on the subleaf (ECX) when KVM does not tell us.
_INDEXED_LEAVES = frozenset({4, 7, 0xB, 0xD, 0xF, 0x10, 0x12, 0x14, 0x17, 0x18, 0x1D, 0x1E, 0x1F, 0x8000001D})

KVM_SIGNATURE = b"KVMKVMKVM\0\0\0"
KVM_LEAVES_BASE_BEHIND_PYEMU = 0x40000100
# KVM paravirtual features offered with kvmclock (leaf 0x40000001 EAX): only the clock and the
# no-op port-0x80 delay; the rest (async PF, steal time, PV EOI...) would need host-side support code.
KVM_FEATURE_CLOCKSOURCE = 1 << 0
KVM_FEATURE_NOP_IO_DELAY = 1 << 1
KVM_FEATURE_CLOCKSOURCE2 = 1 << 3
KVM_FEATURE_CLOCKSOURCE_STABLE_BIT = 1 << 24
KVMCLOCK_FEATURES = (
    KVM_FEATURE_CLOCKSOURCE | KVM_FEATURE_NOP_IO_DELAY | KVM_FEATURE_CLOCKSOURCE2 | KVM_FEATURE_CLOCKSOURCE_STABLE_BIT
)


def _supported_map(supported: tuple[CpuidEntry, ...]) -> dict[tuple[int, int], CpuidEntry]:
    return {(e.function, e.index): e for e in supported}


def _flags_for(leaf: int, subleaf: int, kvm: dict[tuple[int, int], CpuidEntry]) -> int:
    entry = kvm.get((leaf, subleaf))
    if entry is not None:
        return entry.flags & abi.KVM_CPUID_FLAG_SIGNIFCANT_INDEX
    return abi.KVM_CPUID_FLAG_SIGNIFCANT_INDEX if leaf in _INDEXED_LEAVES else 0


def _allowed_bits(kvm: dict[tuple[int, int], CpuidEntry], leaf: int, subleaf: int, reg: str,
                  tsc_deadline: bool) -> int:
    """The feature bits of one register a KVM vCPU can present: KVM_GET_SUPPORTED_CPUID's, the ones KVM
    provides whatever the host, and TSC-deadline when the capability is there."""
    host = kvm.get((leaf, subleaf))
    allowed = host.regs[_REGS.index(reg)] if host is not None else 0
    allowed |= _ALWAYS_ALLOWED.get((leaf, subleaf, reg), 0)
    if (leaf, subleaf, reg) == (1, 0, "ecx") and tsc_deadline:
        allowed |= _TSC_DEADLINE_BIT
    return allowed


def build_vcpu_cpuid(
    table: CpuidTable,
    supported: tuple[CpuidEntry, ...],
    *,
    tsc_khz: int | None = None,
    apic_bus_hz: int | None = None,
    tsc_deadline: bool = False,
    kvmclock: bool = False,
) -> list[CpuidEntry]:
    """The entries for KVM_SET_CPUID2. ``table`` is already specialised for the vCPU (APIC ID set).

    ``tsc_khz``/``apic_bus_hz``: the vCPU's real TSC rate and LAPIC timer bus, written into leaves
    0x15/0x16 when the table has them. ``tsc_deadline``: KVM_CAP_TSC_DEADLINE_TIMER is present (the bit
    then stays if the table asks for it). ``kvmclock``: add the KVM paravirtual clock leaves."""
    kvm = _supported_map(supported)
    out: dict[tuple[int, int], list[int]] = {}
    for (leaf, subleaf), regs in sorted(table.entries.items()):
        values = list(regs)
        masked = FEATURE_REGISTERS.get((leaf, subleaf), ())
        for name in masked:
            values[_REGS.index(name)] &= _allowed_bits(kvm, leaf, subleaf, name, tsc_deadline)
        out[(leaf, subleaf)] = values

    _limit_address_sizes(out, kvm)
    _copy_xsave_leaves(out, kvm)
    if tsc_khz:
        _set_frequency_leaves(out, tsc_khz, apic_bus_hz)
    if kvmclock:
        _add_kvm_leaves(out, kvm)
    return [
        CpuidEntry(leaf, subleaf, _flags_for(leaf, subleaf, kvm), *values)
        for (leaf, subleaf), values in sorted(out.items())
    ]


def _limit_address_sizes(out: dict[tuple[int, int], list[int]], kvm: dict[tuple[int, int], CpuidEntry]) -> None:
    """Never claim more physical/virtual address bits than the host: guest page tables using bits the
    host MMU lacks would fault with reserved-bit errors."""
    ours, host = out.get((0x80000008, 0)), kvm.get((0x80000008, 0))
    if ours is None or host is None:
        return
    phys = min(ours[0] & 0xFF, host.eax & 0xFF)
    virt = min((ours[0] >> 8) & 0xFF, (host.eax >> 8) & 0xFF)
    ours[0] = (ours[0] & ~0xFFFF) | (virt << 8) | phys


def _copy_xsave_leaves(out: dict[tuple[int, int], list[int]], kvm: dict[tuple[int, int], CpuidEntry]) -> None:
    """Leaf 0xD describes the host's XSAVE layout, which KVM dictates; present it only when XSAVE is on."""
    xsave_leaf, xsave_reg, xsave_bit = FEATURES["xsave"]
    if not out.get((xsave_leaf, 0), [0, 0, 0, 0])[_REGS.index(xsave_reg)] >> xsave_bit & 1:
        for key in [k for k in out if k[0] == 0xD]:
            del out[key]
        return
    for (leaf, subleaf), entry in kvm.items():
        if leaf == 0xD:
            values = list(entry.regs)
            if (leaf, subleaf) in out and (leaf, subleaf) in FEATURE_REGISTERS:
                values[0] &= out[(leaf, subleaf)][0]
            out[(leaf, subleaf)] = values


def _set_frequency_leaves(out: dict[tuple[int, int], list[int]], tsc_khz: int, apic_bus_hz: int | None) -> None:
    """Leaf 0x15: TSC = crystal (ECX) * EBX / EAX; Linux also takes the crystal as the LAPIC timer rate,
    so the crystal is the in-kernel LAPIC bus. Leaf 0x16: base/max MHz."""
    if (0x15, 0) in out:
        crystal = apic_bus_hz or out[(0x15, 0)][2] or 25_000_000
        out[(0x15, 0)] = [crystal // 1000, tsc_khz, crystal, 0]
    if (0x16, 0) in out:
        mhz = tsc_khz // 1000
        out[(0x16, 0)] = [mhz, mhz, out[(0x16, 0)][2], 0]


def _add_kvm_leaves(out: dict[tuple[int, int], list[int]], kvm: dict[tuple[int, int], CpuidEntry]) -> None:
    base = KVM_LEAVES_BASE_BEHIND_PYEMU if (0x40000000, 0) in out else 0x40000000
    host_features = kvm.get((0x40000001, 0))
    features = (host_features.eax if host_features is not None else 0) & KVMCLOCK_FEATURES
    sig = KVM_SIGNATURE
    out[(base, 0)] = [base + 1] + [int.from_bytes(sig[i : i + 4], "little") for i in (0, 4, 8)]
    out[(base + 1, 0)] = [features, 0, 0, 0]


def supported_features(supported: tuple[CpuidEntry, ...], *, tsc_deadline: bool = False) -> frozenset[str]:
    """pyemu's feature keys a KVM vCPU can present on this host (the bits :func:`build_vcpu_cpuid`
    keeps, see :func:`_allowed_bits`). ``-cpu`` checks a model against this before the vCPU exists, to warn as QEMU does
    ("host doesn't support requested feature") or refuse with ``enforce=on``."""
    kvm = _supported_map(supported)
    return frozenset(name for name, (leaf, reg, bit) in FEATURES.items()
                     if _allowed_bits(kvm, leaf, FEATURE_SUBLEAF.get(name, 0), reg, tsc_deadline) >> bit & 1)


def dropped_features(table: CpuidTable, entries: list[CpuidEntry]) -> list[str]:
    """Names of pyemu features the table asks for that the KVM vCPU will not have (for a log line)."""
    final = {(e.function, e.index): e.regs for e in entries}
    dropped = []
    for name, (leaf, reg, bit) in FEATURES.items():
        wanted = table.lookup(leaf)[_REGS.index(reg)] >> bit & 1
        have = final.get((leaf, 0), (0, 0, 0, 0))[_REGS.index(reg)] >> bit & 1
        if wanted and not have:
            dropped.append(name)
    return dropped
