"""Named CPU models (``-cpu qemu64``, ``Nehalem``, ``max`` ...) and QEMU's spellings of CPUID features.

A model is a vendor, a family/model/stepping, a brand string and a feature list, as in QEMU 7.2's
``target/i386/cpu.c`` (facts only). :func:`model_cpuid` lays a model over pyemu's CPUID skeleton
(:func:`~pyemu.target.x86.cpuid.default_cpuid`: topology, the TSC/crystal leaves, the hypervisor leaf), so
every model keeps what the boards rely on and differs only in identity and features.

What each accelerator can provide is decided elsewhere: under TCG by :data:`TCG_FEATURES` -- every
feature that Unicorn 2.1.4 (QEMU 5.0's TCG) executes and that a guest test in
``tests/guest/test_cpu_features.py`` exercises -- and under KVM by KVM_GET_SUPPORTED_CPUID
(:mod:`pyemu.accel.kvm.cpuid`). A model feature the accelerator lacks is dropped with QEMU's warning.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyemu.target.x86.cpuid import DEFAULT_FEATURES, FEATURE_SUBLEAF, FEATURES, CpuidTable, _str_regs

#: QEMU's spelling where it is not pyemu's key with ``_`` turned into ``-``.
_QEMU_NAMES = {"sse4_1": "sse4.1", "sse4_2": "sse4.2", "sse3": "pni"}
#: Other names QEMU accepts for a feature (after ``-``/``.`` became ``_``).
ALIASES = {"pni": "sse3", "pclmuldq": "pclmulqdq", "xd": "nx", "i64": "lm"}

_PPRO = ("fpu", "de", "pse", "tsc", "msr", "pae", "mce", "cx8", "apic", "sep", "mtrr", "pge", "mca", "cmov",
         "pat", "pse36", "clflush", "mmx", "fxsr", "sse", "sse2")

#: What the software CPU provides, each backed by a guest test (tests/guest/test_cpu_features.py) or, for
#: the default table's features, by the Linux boot tests. Not here, with the reason:
#: x2apic, tsc_deadline (need RDMSR/WRMSR interception Unicorn 2.1.4 lacks, accel/tcg/msrs.py; tsc_adjust
#: is offered although its MSR ignores writes, accel/tcg/msrs.py TSC_WRITES_IGNORED_WHY says why);
#: vme (QEMU 5.0's TCG does not implement it: not in its TCG_FEATURES); avx, avx2, fma, f16c, avx512f
#: (no AVX in QEMU 5.0's TCG; VZEROUPPER runs without the #UD it owes); rtm, hle (XBEGIN decodes as a MOV);
#: rdpid, sha_ni, invpcid, xsavec, xsaves (#UD under max's engine model, tests/guest/test_cpu_features.py;
#: in no Unicorn model); monitor (#UD there); mpx (only Unicorn's Snowridge lists it, which lacks PKU and
#: CLWB: one engine model per vCPU); sse4a (INSERTQ computes a wrong result: tested); cr8legacy (the engine's
#: CR8 is not pyemu's userspace-LAPIC TPR); umip, vmx, svm (in no Unicorn model).
#: rdseed is executed although no Unicorn model's CPUID lists it;
#: la57 (Unicorn's Icelake-Server has it, but pyemu's TLB-fill hook and boards assume 4-level paging).
TCG_FEATURES: frozenset[str] = frozenset(DEFAULT_FEATURES) - {"vme"} | {
    "pclmulqdq", "movbe", "aes", "xsave", "rdrand", "fsgsbase", "bmi1", "bmi2", "erms", "smep", "adx", "smap",
    "clflushopt", "clwb", "pku", "xsaveopt", "xgetbv1", "rdtscp", "pdpe1gb", "abm", "rdseed",
}

TCG_WITHHELD_FEATURES = ("x2apic", "tsc_deadline")
"""Default-table features the software CPU takes out of every vCPU's CPUID: both need RDMSR/WRMSR
interception (accel/tcg/msrs.py)."""

#: XCR0 components ``-cpu max`` offers under TCG: x87 and SSE state only (no AVX in the engine).
TCG_XCR0 = 0x3
XSAVE_LEGACY_SIZE = 0x240  # 512-byte legacy area + 64-byte header


@dataclass(frozen=True)
class CpuModel:
    """One ``-cpu`` model. ``features``: what the model asks for (pyemu feature keys)."""

    name: str
    description: str
    vendor: str = "GenuineIntel"
    family: int = 6
    model: int = 0x55
    stepping: int = 4
    brand: str = "pyemu virtual CPU"
    features: frozenset[str] = frozenset()
    kvm_only: bool = False
    every_supported: bool = False
    """``max`` / ``host``: everything the accelerator provides, never a warning."""


def _model(name: str, description: str, features: tuple[str, ...], **kw: object) -> CpuModel:
    return CpuModel(name, description, features=frozenset(features), **kw)  # type: ignore[arg-type]


MODELS: dict[str, CpuModel] = {m.name: m for m in (
    _model("qemu64", "QEMU Virtual CPU version 2.5+",
           (*_PPRO, "sse3", "cx16", "hypervisor", "syscall", "nx", "lm", "lahf_lm", "svm"),
           vendor="AuthenticAMD", family=15, model=107, stepping=1, brand="QEMU Virtual CPU version 2.5+"),
    _model("kvm64", "Common KVM processor",
           (*_PPRO, "sse3", "cx16", "hypervisor", "syscall", "nx", "lm"),
           family=15, model=6, stepping=1, brand="Common KVM processor"),
    _model("Nehalem", "Intel Core i7 9xx (Nehalem Class Core i7)",
           (*_PPRO, "vme", "sse3", "ssse3", "cx16", "sse4_1", "sse4_2", "popcnt", "hypervisor", "syscall", "nx",
            "lm", "lahf_lm"),
           family=6, model=26, stepping=3, brand="Intel Core i7 9xx (Nehalem Class Core i7)"),
    _model("Westmere", "Westmere E56xx/L56xx/X56xx (Nehalem-C)",
           (*_PPRO, "vme", "sse3", "pclmulqdq", "ssse3", "cx16", "sse4_1", "sse4_2", "popcnt", "aes",
            "hypervisor", "syscall", "nx", "lm", "lahf_lm", "arat"),
           family=6, model=44, stepping=1, brand="Westmere E56xx/L56xx/X56xx (Nehalem-C)"),
    _model("host", "processor with all supported host features", (), kvm_only=True, every_supported=True),
    _model("max", "Enables all features supported by the accelerator in the current host", (),
           every_supported=True),
)}

#: Options of QEMU's models that describe migration/cache policy, not guest CPUID bits: accepted, ignored.
POLICY_PROPS = frozenset({"migratable", "host_cache_info", "l3_cache", "check", "kvm", "pmu"})


def qemu_name(feature: str) -> str:
    """QEMU's spelling of pyemu's feature key (``sse4_1`` -> ``sse4.1``, ``lahf_lm`` -> ``lahf-lm``)."""
    return _QEMU_NAMES.get(feature, feature.replace("_", "-"))


def feature_key(name: str) -> str | None:
    """pyemu's key for a name as QEMU accepts it (``sse4.1``, ``sse4_1``, ``sse4-1``, ``pni``), or None."""
    key = name.lower().replace("-", "_").replace(".", "_")
    key = ALIASES.get(key, key)
    return key if key in FEATURES else None


def where(feature: str) -> str:
    """QEMU's location text for a feature (``feature_word_description``): ``CPUID.01H:ECX.vmx [bit 5]``."""
    leaf, reg, bit = FEATURES[feature]
    return f"CPUID.{leaf:02X}H:{reg.upper()}.{qemu_name(feature)} [bit {bit}]"


def recognized_flags() -> list[str]:
    return sorted(qemu_name(f) for f in FEATURES)


def model_cpuid(model: CpuModel, skeleton: CpuidTable, features: frozenset[str]) -> CpuidTable:
    """``skeleton`` (pyemu's default table for this board) with ``model``'s identity and exactly
    ``features`` (already reduced to what the accelerator provides)."""
    table = CpuidTable(dict(skeleton.entries))
    if not model.every_supported:
        ebx, edx, ecx = _str_regs(model.vendor)
        table.entries[(0, 0)] = (table.lookup(0)[0], ebx, ecx, edx)
        eax, b, c, d = table.lookup(1)
        signature = ((model.family if model.family < 15 else 15) << 8) | ((model.model & 0xF) << 4) \
            | ((model.model >> 4) << 16) | model.stepping | (max(0, model.family - 15) << 20)
        table.entries[(1, 0)] = (signature, b, c, d)
        brand = model.brand[:47].ljust(48, "\0").encode("ascii")
        for i, leaf in enumerate((0x80000002, 0x80000003, 0x80000004)):
            chunk = brand[16 * i : 16 * i + 16]
            table.entries[(leaf, 0)] = tuple(  # type: ignore[assignment]
                int.from_bytes(chunk[j : j + 4], "little") for j in (0, 4, 8, 12))
    table = table.without(*FEATURES)  # every named bit cleared, then exactly the wanted ones set
    table = table.with_features(*sorted(features))
    if "xsave" in features:
        table.entries[(0xD, 0)] = (TCG_XCR0, XSAVE_LEGACY_SIZE, XSAVE_LEGACY_SIZE, 0)
    else:
        for key in [k for k in table.entries if k[0] == 0xD]:
            del table.entries[key]
    if model.vendor == "AuthenticAMD":  # AMD repeats leaf 1's EDX bits in 0x80000001 EDX (QEMU does too)
        aliases = 0x0183F3FF
        a, b, c, d = table.lookup(0x80000001)
        table.entries[(0x80000001, 0)] = (a, b, c, (d & ~aliases) | (table.lookup(1)[3] & aliases))
    return table
