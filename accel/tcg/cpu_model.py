"""Which of Unicorn's CPU models an engine runs, chosen from the CPUID table the guest sees.

Why it matters: pyemu answers CPUID itself (:mod:`pyemu.accel.tcg.io_hooks`), but the engine's translator
and helpers consult the engine's own model: an instruction whose feature the engine model lacks raises #UD
(XGETBV, RDRAND, MOVBE, ADCX, CLWB, RDTSCP, WRFSBASE...), and the CR4 write helper silently clears SMAP and
PKE when the engine model lacks them (``cpu_x86_update_cr4`` in QEMU 5.0). So each engine gets the
smallest Unicorn model whose instruction-level features cover the guest's CPUID, so that what the guest
is told it may execute, it can, and most of what it is told it may not, raises #UD as on hardware.

Measured on Unicorn 2.1.4 (``uc_ctl_set_cpu_model`` then CPUID without pyemu's hook; the bitmaps below are
checked against the engine by tests/unit/test_cpu_models.py). What still differs from hardware, with
no Unicorn model to fix it: the CR4 write helper never raises #GP -- CR4.OSXSAVE, FSGSBASE, SMEP, UMIP,
PCIDE, VMXE and LA57 are accepted whatever the model says (only SMAP and PKE follow the model; pyemu's
block gate raises the #GP the guest's CPUID calls for, :mod:`pyemu.accel.tcg.cr4_guard`); XSETBV
accepts the engine model's XCR0 components (Skylake-Server: 0x2e7) although pyemu's CPUID leaf 0xD
offers x87|SSE only; the default Unicorn model before this choice was Haswell.
"""

from __future__ import annotations

from unicorn import x86_const as x86

from pyemu.target.x86.cpuid import FEATURE_SUBLEAF, FEATURES, CpuidTable

# (Unicorn model, leaf 1 ECX, leaf 1 EDX, leaf 7 EBX, leaf 7 ECX, leaf 0xD.1 EAX, 0x80000001 ECX, EDX),
# smallest first. Leaf 1 ECX bit 27 (OSXSAVE) mirrors CR4 and is not a model feature.
_MEASURED: tuple[tuple[str, int, int, int, int, int, int, int], ...] = (
    ("KVM64", 0x80002001, 0x078BFBFD, 0, 0, 0, 0x00, 0x20100800),
    ("QEMU64", 0x80002001, 0x078BFBFD, 0, 0, 0, 0x05, 0x2193FBFD),
    ("NEHALEM", 0x80982201, 0x078BFBFD, 0, 0, 0, 0x01, 0x20100800),
    ("WESTMERE", 0x82982203, 0x078BFBFD, 0, 0, 0, 0x01, 0x20100800),
    ("SANDYBRIDGE", 0x8E982203, 0x078BFBFD, 0, 0, 1, 0x01, 0x28100800),
    ("IVYBRIDGE", 0xCE982203, 0x078BFBFD, 0x281, 0, 1, 0x01, 0x28100800),
    ("HASWELL", 0xCED82203, 0x078BFBFD, 0x389, 0, 1, 0x21, 0x28100800),
    ("BROADWELL", 0xCED82203, 0x078BFBFD, 0x180389, 0, 1, 0x21, 0x28100800),
    ("SKYLAKE_CLIENT", 0xCED82203, 0x078BFBFD, 0x180389, 0, 5, 0x21, 0x28100800),
    ("SKYLAKE_SERVER", 0xCED82203, 0x078BFBFD, 0x1980389, 0x8, 5, 0x21, 0x2C100800),
)
_SLOTS = ((1, 0, "ecx"), (1, 0, "edx"), (7, 0, "ebx"), (7, 0, "ecx"), (0xD, 1, "eax"),
          (0x80000001, 0, "ecx"), (0x80000001, 0, "edx"))


def _features(bitmaps: tuple[int, ...]) -> frozenset[str]:
    names = set()
    for name, (leaf, reg, bit) in FEATURES.items():
        slot = (leaf, FEATURE_SUBLEAF.get(name, 0), reg)
        if slot in _SLOTS and bitmaps[_SLOTS.index(slot)] >> bit & 1:
            names.add(name)
    return frozenset(names)


#: Unicorn model name -> the named features its engine executes, smallest model first.
ENGINE_MODELS: dict[str, frozenset[str]] = {row[0]: _features(row[1:]) for row in _MEASURED}
#: Features some engine model has: the ones the engine gates on its model (others are pyemu's business).
ENGINE_GATED: frozenset[str] = frozenset().union(*ENGINE_MODELS.values())
#: Features no engine model lists but the engine executes when it has another one: RDSEED is decoded
#: under the RDRAND check (measured: #UD under Westmere, executed under Ivy Bridge and later).
ENGINE_NEEDS: dict[str, str] = {"rdseed": "rdrand"}


def engine_model_name(table: CpuidTable) -> str:
    """The smallest Unicorn model executing every engine-gated feature ``table`` offers (the largest
    measured model when none covers them all)."""
    wanted = {ENGINE_NEEDS.get(f, f) for f in table.features()} & ENGINE_GATED
    for name, features in ENGINE_MODELS.items():
        if wanted <= features:
            return name
    return next(reversed(ENGINE_MODELS))


def engine_model(table: CpuidTable) -> int:
    """The ``UC_CPU_X86_*`` value for :func:`engine_model_name` (for ``Uc.ctl_set_cpu_model``)."""
    return int(getattr(x86, f"UC_CPU_X86_{engine_model_name(table)}"))
