"""The CPUID table both accelerators present to the guest.

One table describes the virtual CPU model: vendor, family, feature bits, topology, the TSC/crystal leaves
(0x15/0x16, so Linux skips timer calibration) and the hypervisor leaves at 0x40000000. The software CPU
answers CPUID from it through a hook; KVM filters KVM_GET_SUPPORTED_CPUID through it. Accelerator-specific
differences (no x2APIC/TSC-deadline under TCG) are applied by :func:`CpuidTable.without`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Feature bits by (leaf, register, bit).
FEATURES: dict[str, tuple[int, str, int]] = {
    "fpu": (1, "edx", 0), "vme": (1, "edx", 1), "de": (1, "edx", 2), "pse": (1, "edx", 3),
    "tsc": (1, "edx", 4), "msr": (1, "edx", 5), "pae": (1, "edx", 6), "mce": (1, "edx", 7),
    "cx8": (1, "edx", 8), "apic": (1, "edx", 9), "sep": (1, "edx", 11), "mtrr": (1, "edx", 12),
    "pge": (1, "edx", 13), "mca": (1, "edx", 14), "cmov": (1, "edx", 15), "pat": (1, "edx", 16),
    "pse36": (1, "edx", 17), "clflush": (1, "edx", 19), "mmx": (1, "edx", 23), "fxsr": (1, "edx", 24),
    "sse": (1, "edx", 25), "sse2": (1, "edx", 26),
    "sse3": (1, "ecx", 0), "pclmulqdq": (1, "ecx", 1), "ssse3": (1, "ecx", 9), "cx16": (1, "ecx", 13),
    "sse4_1": (1, "ecx", 19), "sse4_2": (1, "ecx", 20), "x2apic": (1, "ecx", 21), "movbe": (1, "ecx", 22),
    "popcnt": (1, "ecx", 23), "tsc_deadline": (1, "ecx", 24), "aes": (1, "ecx", 25),
    "xsave": (1, "ecx", 26), "hypervisor": (1, "ecx", 31),
    "fsgsbase": (7, "ebx", 0), "tsc_adjust": (7, "ebx", 1), "bmi1": (7, "ebx", 3), "bmi2": (7, "ebx", 8), "erms": (7, "ebx", 9),
    "arat": (6, "eax", 2),
    "lahf_lm": (0x80000001, "ecx", 0),
    "syscall": (0x80000001, "edx", 11), "nx": (0x80000001, "edx", 20), "pdpe1gb": (0x80000001, "edx", 26),
    "rdtscp": (0x80000001, "edx", 27), "lm": (0x80000001, "edx", 29),
    "invtsc": (0x80000007, "edx", 8),
    # Beyond the default table: what named models and ``-cpu max`` may offer (pyemu.target.x86.cpu_models).
    "monitor": (1, "ecx", 3), "vmx": (1, "ecx", 5), "fma": (1, "ecx", 12), "pcid": (1, "ecx", 17),
    "avx": (1, "ecx", 28), "f16c": (1, "ecx", 29), "rdrand": (1, "ecx", 30), "ht": (1, "edx", 28),
    "smep": (7, "ebx", 7), "hle": (7, "ebx", 4), "avx2": (7, "ebx", 5), "invpcid": (7, "ebx", 10),
    "rtm": (7, "ebx", 11), "mpx": (7, "ebx", 14), "avx512f": (7, "ebx", 16), "rdseed": (7, "ebx", 18),
    "adx": (7, "ebx", 19), "smap": (7, "ebx", 20), "clflushopt": (7, "ebx", 23), "clwb": (7, "ebx", 24),
    "sha_ni": (7, "ebx", 29), "arch_capabilities": (7, "edx", 29),
    "umip": (7, "ecx", 2), "pku": (7, "ecx", 3), "la57": (7, "ecx", 16), "rdpid": (7, "ecx", 22),
    "svm": (0x80000001, "ecx", 2), "cr8legacy": (0x80000001, "ecx", 4), "abm": (0x80000001, "ecx", 5),
    "sse4a": (0x80000001, "ecx", 6), "3dnowprefetch": (0x80000001, "ecx", 8),
    # Leaf 0xD sub-leaf 1 (see FEATURE_SUBLEAF).
    "xsaveopt": (0xD, "eax", 0), "xsavec": (0xD, "eax", 1), "xgetbv1": (0xD, "eax", 2), "xsaves": (0xD, "eax", 3),
}
#: Features that live in a sub-leaf other than 0 (all others: sub-leaf 0).
FEATURE_SUBLEAF: dict[str, int] = {"xsaveopt": 1, "xsavec": 1, "xgetbv1": 1, "xsaves": 1}

_REGS = ("eax", "ebx", "ecx", "edx")
# Leaves whose answer depends on ECX (sub-leaf); others ignore ECX.
_INDEXED_LEAVES = frozenset({4, 7, 0xB, 0xD, 0x1F})


def _str_regs(text: str) -> tuple[int, int, int]:
    raw = text.encode("ascii")
    return tuple(int.from_bytes(raw[i : i + 4], "little") for i in (0, 4, 8))  # type: ignore[return-value]


@dataclass
class CpuidTable:
    """Leaf/sub-leaf -> (eax, ebx, ecx, edx). Leaves not present return zeros, as out-of-range leaves
    on Intel return the highest basic leaf's data only for leaves above the maximum (we return zeros)."""

    entries: dict[tuple[int, int], tuple[int, int, int, int]] = field(default_factory=dict)

    def lookup(self, leaf: int, subleaf: int = 0) -> tuple[int, int, int, int]:
        key = (leaf, subleaf if leaf in _INDEXED_LEAVES else 0)
        return self.entries.get(key, (0, 0, 0, 0))

    def set(self, leaf: int, subleaf: int, eax: int, ebx: int, ecx: int, edx: int) -> None:
        self.entries[(leaf, subleaf)] = (eax, ebx, ecx, edx)

    def has(self, feature: str) -> bool:
        leaf, reg, bit = FEATURES[feature]
        return bool(self.lookup(leaf, FEATURE_SUBLEAF.get(feature, 0))[_REGS.index(reg)] >> bit & 1)

    def features(self) -> frozenset[str]:
        """Every named feature this table offers (the guest-visible feature set, e.g. for migration)."""
        return frozenset(name for name in FEATURES if self.has(name))

    def _set_bit(self, feature: str, on: bool) -> None:
        leaf, reg, bit = FEATURES[feature]
        subleaf = FEATURE_SUBLEAF.get(feature, 0)
        values = list(self.lookup(leaf, subleaf))
        index = _REGS.index(reg)
        values[index] = values[index] | (1 << bit) if on else values[index] & ~(1 << bit)
        self.entries[(leaf, subleaf)] = tuple(values)  # type: ignore[assignment]

    def without(self, *features: str) -> "CpuidTable":
        """A copy with ``features`` cleared (e.g. what an accelerator cannot provide)."""
        table = CpuidTable(dict(self.entries))
        for feature in features:
            table._set_bit(feature, False)
        return table

    def with_features(self, *features: str) -> "CpuidTable":
        table = CpuidTable(dict(self.entries))
        for feature in features:
            table._set_bit(feature, True)
        return table

    def with_apic_id(self, apic_id: int) -> "CpuidTable":
        """A copy for the vCPU with ``apic_id`` (leaf 1 EBX[31:24], leaf 0xB EDX)."""
        table = CpuidTable(dict(self.entries))
        eax, ebx, ecx, edx = table.lookup(1)
        table.entries[(1, 0)] = (eax, (ebx & 0x00FFFFFF) | (apic_id << 24), ecx, edx)
        for sub in (0, 1):
            if (0xB, sub) in table.entries:
                a, b, c, _ = table.entries[(0xB, sub)]
                table.entries[(0xB, sub)] = (a, b, c, apic_id)
        return table


DEFAULT_FEATURES = (
    "fpu", "vme", "de", "pse", "tsc", "msr", "pae", "mce", "cx8", "apic", "sep", "mtrr", "pge", "mca",
    "cmov", "pat", "pse36", "clflush", "mmx", "fxsr", "sse", "sse2", "sse3", "ssse3", "cx16", "sse4_1",
    "sse4_2", "popcnt", "hypervisor", "arat", "lahf_lm", "syscall", "nx", "lm", "invtsc", "tsc_adjust",
    "arch_capabilities",
)
"""Both TSC bits are what Linux 6.1 needs (with family 6's CONSTANT_TSC) to trust the TSC without the
clocksource watchdog (arch/x86/kernel/tsc.c ``check_system_tsc_reliable``): ``invtsc`` (0x80000007 EDX[8],
Linux's NONSTOP_TSC) because both guest TSCs tick with the host's invariant TSC, and ``tsc_adjust``
(IA32_TSC_ADJUST, MSR 0x3b), which KVM implements and the software CPU reads as 0 but cannot write
(:data:`pyemu.accel.tcg.msrs.TSC_WRITES_IGNORED_WHY`).

``arch_capabilities`` (CPUID.7.0:EDX[29], the IA32_ARCH_CAPABILITIES MSR) is how a family-6 Intel CPU says
which speculative-execution flaws it does not have; without it Linux assumes all of them and pays for page-
table isolation at every kernel entry. KVM fills the MSR from the host; the software CPU's value is
:data:`pyemu.accel.tcg.msrs.SOFTWARE_CPU_ARCH_CAPABILITIES`."""

TSC_CRYSTAL_HZ = 25_000_000  # leaf 0x15 crystal; the LAPIC timer counts at crystal / divide
DEFAULT_TSC_HZ = 2_600_000_000  # when the accelerator cannot say (boards pass the real rate)


def default_cpuid(
    *,
    vcpus: int = 1,
    tsc_hz: int = DEFAULT_TSC_HZ,
    features: tuple[str, ...] = DEFAULT_FEATURES,
    hypervisor_signature: str = "PyemuVMM\0\0\0\0",
) -> CpuidTable:
    """The default pyemu CPU model: a family-6 x86-64 with SSE4.2, no AVX, no XSAVE (which neither
    engine needs for a Linux guest to boot), the crystal-clock leaves and a hypervisor leaf."""
    table = CpuidTable()
    ebx, edx, ecx = _str_regs("GenuineIntel")
    table.set(0, 0, 0x16, ebx, ecx, edx)
    family, model, stepping = 6, 0x55, 4
    signature = (family << 8) | ((model & 0xF) << 4) | ((model >> 4) << 16) | stepping
    table.set(1, 0, signature, (8 << 8) | (max(1, vcpus) << 16), 0, 0)  # CLFLUSH size 64, logical count
    table.set(6, 0, 0, 0, 0, 0)
    table.set(7, 0, 0, 0, 0, 0)
    # One package of ``vcpus`` single-thread cores, as QEMU 7.2's ``-smp N`` on microvm (cores preferred
    # over sockets). EAX is how far to shift the APIC ID to reach the next level: 0 bits of thread ID, then
    # enough bits for the core IDs; with 0 there, Linux put every vCPU in a package of its own and ran
    # the cross-package TSC warp test and delay-loop calibration at each AP bring-up.
    table.set(0xB, 0, 0, 1, 0x100, 0)  # SMT level: one thread per core
    table.set(0xB, 1, (max(1, vcpus) - 1).bit_length(), max(1, vcpus), 0x201, 0)  # core level
    # TSC = crystal * ebx / eax; 0x15 ECX crystal Hz. Linux takes tsc_khz and the APIC timer rate from it.
    ratio_num = tsc_hz // 1_000_000
    table.set(0x15, 0, TSC_CRYSTAL_HZ // 1_000_000, ratio_num, TSC_CRYSTAL_HZ, 0)
    table.set(0x16, 0, tsc_hz // 1_000_000, tsc_hz // 1_000_000, 100, 0)
    table.set(0x80000000, 0, 0x80000008, 0, 0, 0)
    table.set(0x80000001, 0, 0, 0, 0, 0)
    brand = "pyemu virtual CPU".ljust(48, "\0")
    for i, leaf in enumerate((0x80000002, 0x80000003, 0x80000004)):
        chunk = brand[16 * i : 16 * i + 16].encode("ascii")
        table.set(leaf, 0, *(int.from_bytes(chunk[j : j + 4], "little") for j in (0, 4, 8, 12)))
    table.set(0x80000007, 0, 0, 0, 0, 0)
    table.set(0x80000008, 0, 0x3028, 0, 0, 0)  # 40 physical, 48 virtual address bits
    a, b, c = _str_regs(hypervisor_signature)
    table.set(0x40000000, 0, 0x40000001, a, b, c)
    table = table.with_features(*features)
    return table
