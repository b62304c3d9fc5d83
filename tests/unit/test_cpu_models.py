"""``-cpu``: models, QEMU's feature spellings, warnings and errors, ``-cpu help``, the engine model the
software CPU runs, and the CPU's place in the migration stream's identity."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from unicorn import UC_ARCH_X86, UC_MODE_64, Uc
from unicorn import x86_const as x86

from pyemu.accel.tcg.cpu_model import _MEASURED, ENGINE_MODELS, engine_model_name
from pyemu.errors import ConfigError
from pyemu.migration.errors import StreamMismatch
from pyemu.migration.vmstate import check_identity, identity
from pyemu.system.cpu_options import CpuOptions, cpu_help
from pyemu.system.options import EarlyExit, parse_args
from pyemu.target.x86.boot.synthetic import make_multiboot_binary
from pyemu.target.x86.cpu_models import MODELS, TCG_FEATURES, TCG_WITHHELD_FEATURES, feature_key, where
from pyemu.target.x86.cpuid import default_cpuid

SPIN = bytes([0xEB, 0xFE])


def tcg_table(model: str | None, *props: tuple[str, str], warn=None):
    base = default_cpuid().without(*TCG_WITHHELD_FEATURES)
    return CpuOptions(model, tuple(props)).apply(base, "tcg", warn)


@pytest.mark.parametrize("spelling", ["sse4.1", "sse4_1", "sse4-1", "SSE4.1"])
def test_feature_spellings_as_qemu(spelling: str) -> None:
    assert feature_key(spelling) == "sse4_1"
    assert not tcg_table("max", (f"-{spelling}", "on")).has("sse4_1")
    assert not tcg_table("max", (spelling, "off")).has("sse4_1")


def test_aliases_and_qemu_location_text() -> None:
    assert feature_key("pni") == "sse3" and feature_key("lahf-lm") == "lahf_lm"
    assert where("vmx") == "CPUID.01H:ECX.vmx [bit 5]"
    assert where("avx512f") == "CPUID.07H:EBX.avx512f [bit 16]"
    assert where("svm") == "CPUID.80000001H:ECX.svm [bit 2]"


def test_unknown_feature_fails_with_qemus_messages() -> None:
    with pytest.raises(ConfigError, match=r"^Property 'qemu64-x86_64-cpu\.foo' not found$"):
        CpuOptions("qemu64", (("+foo", "on"),))
    with pytest.raises(ConfigError, match=r"^can't apply global qemu64-x86_64-cpu\.foo=on: "
                                          r"Property 'qemu64-x86_64-cpu\.foo' not found$"):
        CpuOptions("qemu64", (("foo", "on"),))
    with pytest.raises(ConfigError, match=r"^unable to find CPU model 'nosuch'$"):
        CpuOptions("nosuch")


def test_unsupported_features_warn_as_qemu_and_are_dropped() -> None:
    warnings: list[str] = []
    table = tcg_table("qemu64", ("+vmx", "on"), ("+avx512f", "on"), warn=warnings.append)
    assert warnings == ["TCG doesn't support requested feature: CPUID.01H:ECX.vmx [bit 5]",
                        "TCG doesn't support requested feature: CPUID.07H:EBX.avx512f [bit 16]",
                        "TCG doesn't support requested feature: CPUID.80000001H:ECX.svm [bit 2]"]
    assert not table.has("vmx") and not table.has("avx512f") and not table.has("svm")
    with pytest.raises(ConfigError, match=re.escape("CPUID.01H:ECX.vmx [bit 5]")):
        tcg_table("qemu64", ("+vmx", "on"), ("enforce", "on"))


def test_max_never_warns_and_offers_the_tcg_set() -> None:
    warnings: list[str] = []
    assert tcg_table("max", warn=warnings.append).features() == TCG_FEATURES
    assert warnings == []


def test_models_identity_and_features() -> None:
    qemu64 = tcg_table("qemu64")
    assert qemu64.lookup(0)[1:] == (0x68747541, 0x444D4163, 0x69746E65)  # "AuthenticAMD" in EBX, ECX, EDX
    assert qemu64.lookup(1)[0] == 0x00060FB1  # family 15, model 107, stepping 1 (QEMU's qemu64)
    assert qemu64.lookup(0x80000001)[3] & 1  # AMD repeats FPU etc. in 0x80000001 EDX
    assert not qemu64.has("sse4_1") and not qemu64.has("popcnt") and qemu64.has("sse3")
    westmere = tcg_table("Westmere")
    assert westmere.has("aes") and westmere.has("pclmulqdq") and not westmere.has("rdtscp")
    assert westmere.lookup(1)[0] == 0x000206C1
    assert tcg_table("kvm64").lookup(1)[0] == 0x00000F61
    assert (0xD, 0) in tcg_table("max").entries and (0xD, 0) not in tcg_table("Nehalem").entries
    default = default_cpuid().without(*TCG_WITHHELD_FEATURES)
    assert tcg_table(None) == default  # no -cpu: pyemu's historical table, unchanged


def test_cpu_help_in_qemus_layout() -> None:
    with pytest.raises(EarlyExit) as done:
        parse_args(["-cpu", "help"])
    text = done.value.text
    assert text.startswith("Available CPUs:\n")
    for name in MODELS:
        assert f"\nx86 {name:<22}" in text
    assert "\nRecognized CPUID flags:\n" in text
    flags = text.split("Recognized CPUID flags:\n", 1)[1].split()
    assert {"sse4.1", "smap", "pku", "xsaveopt", "3dnowprefetch", "lahf-lm"} <= set(flags)


def test_engine_bitmaps_are_what_unicorn_reports() -> None:
    """The engine-model table of pyemu.accel.tcg.cpu_model, measured again on the installed Unicorn."""
    for name, ecx1, edx1, ebx7, ecx7, eax_d1, ecx_e1, edx_e1 in _MEASURED:
        def cpuid(leaf: int, sub: int = 0) -> tuple[int, int, int, int]:
            uc = Uc(UC_ARCH_X86, UC_MODE_64)
            uc.ctl_set_cpu_model(getattr(x86, f"UC_CPU_X86_{name}"))
            uc.mem_map(0x1000, 0x1000)
            uc.mem_write(0x1000, b"\x0f\xa2")
            uc.reg_write(x86.UC_X86_REG_RAX, leaf)
            uc.reg_write(x86.UC_X86_REG_RCX, sub)
            uc.emu_start(0x1000, 0x1002)
            return tuple(uc.reg_read(r) for r in (x86.UC_X86_REG_RAX, x86.UC_X86_REG_RBX,  # type: ignore[return-value]
                                                  x86.UC_X86_REG_RCX, x86.UC_X86_REG_RDX))
        osxsave = 1 << 27
        assert (cpuid(1)[2] & ~osxsave, cpuid(1)[3]) == (ecx1 & ~osxsave, edx1), name
        assert cpuid(7)[1:3] == (ebx7, ecx7), name
        assert cpuid(0xD, 1)[0] == eax_d1, name
        assert cpuid(0x80000001)[2:] == (ecx_e1, edx_e1), name


def test_engine_model_choice() -> None:
    assert engine_model_name(tcg_table("max")) == "SKYLAKE_SERVER"
    assert engine_model_name(tcg_table("qemu64")) == "QEMU64"
    assert engine_model_name(tcg_table("Westmere")) == "WESTMERE"
    assert engine_model_name(tcg_table(None)) == "NEHALEM"
    assert engine_model_name(tcg_table("Westmere", ("+rdseed", "on"))) == "IVYBRIDGE"  # RDSEED: RDRAND's gate
    assert TCG_FEATURES - {"hypervisor", "arat", "invtsc", "tsc_adjust", "rdseed", "arch_capabilities"} <= ENGINE_MODELS["SKYLAKE_SERVER"]


@pytest.fixture
def spin_kernel(tmp_path):
    path = tmp_path / "spin.bin"
    path.write_bytes(make_multiboot_binary(SPIN))
    return str(path)


def _identity(spin_kernel: str, *cpu: str) -> dict:
    from pyemu.accel.tcg.accel import TcgAccelerator
    from pyemu.machines.microvm import BootSource, Microvm

    config = parse_args([*cpu, "-kernel", spin_kernel, "-serial", "null", "-m", "32"])
    machine = Microvm.create(config, TcgAccelerator(), BootSource(spin_kernel, None, config.append))
    try:
        return identity(machine)
    finally:
        machine.close()


def test_migration_stream_records_the_cpu_and_refuses_another(spin_kernel: str) -> None:
    default = _identity(spin_kernel)
    assert "cpu" not in default["options"]  # streams without -cpu are as before
    max_id = _identity(spin_kernel, "-cpu", "max,-smap")
    assert max_id["options"]["cpu"] == "max,-smap"
    check_identity({**max_id, "run_state": "running"}, _identity(spin_kernel, "-cpu", "max,smap=off"))
    with pytest.raises(StreamMismatch, match="board options differ.*'cpu': 'max,-smap'.*'cpu': 'qemu64'"):
        check_identity({**max_id, "run_state": "running"}, _identity(spin_kernel, "-cpu", "qemu64"))
    with pytest.raises(StreamMismatch, match="board options differ"):
        check_identity({**max_id, "run_state": "running"}, default)


def test_cpu_max_boots_a_kernel_from_the_command_line(spin_kernel: str) -> None:
    """A warning goes to stderr in QEMU's form; the VM still runs (the spinning kernel is stopped)."""
    proc = subprocess.run([sys.executable, "-m", "pyemu.system.main", "-accel", "tcg", "-cpu", "qemu64,+vmx",
                           "-kernel", spin_kernel, "-serial", "none", "-m", "32", "-S", "-display", "none",
                           "-qmp", "stdio"], input='{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n',
                          capture_output=True, text=True, timeout=120)
    assert "pyemu: warning: TCG doesn't support requested feature: CPUID.01H:ECX.vmx [bit 5]" in proc.stderr
    assert proc.returncode == 0, proc.stderr


# -- KVM: the entries pyemu hands KVM_SET_CPUID2 for a model ----------------------------------------------
def test_kvm_entries_follow_the_model_within_what_kvm_supports() -> None:
    """Named models are the model's features intersected with KVM_GET_SUPPORTED_CPUID; ``host`` is every
    feature pyemu knows that KVM supports. (On this project's PVM hosts the guest then sees the host's
    CPUID whatever is set -- measured with a guest program -- so this checks what pyemu asks KVM for.)"""
    from pyemu.accel.kvm.cpuid import build_vcpu_cpuid
    from pyemu.accel.kvm.system import KvmSystem
    from pyemu.testing.accelerators import kvm_unavailable_reason

    reason = kvm_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    system = KvmSystem()
    try:
        supported = system.supported_cpuid()
    finally:
        system.close()
    kvm = {(e.function, e.index): e.regs for e in supported}

    def entries(model: str) -> dict[tuple[int, int], tuple[int, int, int, int]]:
        table = CpuOptions(model).apply(default_cpuid(), "kvm")
        return {(e.function, e.index): e.regs for e in build_vcpu_cpuid(table, supported)}

    westmere = entries("Westmere")
    assert westmere[(7, 0)][1] == 0  # no leaf-7 features in Westmere
    assert westmere[(1, 0)][2] & (1 << 25) == kvm[(1, 0)][2] & (1 << 25)  # aes where KVM has it
    assert not westmere[(1, 0)][2] & (1 << 28)  # no AVX
    host = entries("host")
    for leaf, reg in (((7, 0), 1), ((1, 0), 3), ((0x80000001, 0), 2)):
        assert host[leaf][reg] & ~kvm[leaf][reg] == 0, (leaf, reg)
    assert host[(7, 0)][1] == kvm[(7, 0)][1] & host[(7, 0)][1] and host[(7, 0)][1] != 0


def test_kvm_features_are_what_supported_cpuid_says() -> None:
    """KVM_GET_SUPPORTED_CPUID's bits as pyemu's feature keys, with the bits KVM adds whatever the host
    (hypervisor, ARAT) and TSC-deadline only with its capability."""
    from pyemu.accel.kvm.cpuid import supported_features
    from pyemu.accel.kvm.system import CpuidEntry

    sse42, aes, smep, xsaveopt = 1 << 20, 1 << 25, 1 << 7, 1 << 0
    entries = (CpuidEntry(1, 0, 0, 0, 0, sse42 | aes, 0), CpuidEntry(7, 0, 1, 0, smep, 0, 0),
               CpuidEntry(0xD, 1, 1, xsaveopt, 0, 0, 0))
    found = supported_features(entries)
    assert {"sse4_2", "aes", "smep", "xsaveopt", "hypervisor"} <= found
    assert not found & {"sse4_1", "smap", "tsc_deadline", "avx"}
    assert "tsc_deadline" in supported_features(entries, tsc_deadline=True)


def test_a_model_feature_the_host_kvm_lacks_is_dropped_with_qemus_warning() -> None:
    """Under KVM the model is checked against what this host's KVM can present, as QEMU 7.2 does:
    "host doesn't support requested feature: ..." per feature, or an error with enforce=on; max takes
    exactly what KVM has, without a warning."""
    host_has = frozenset(MODELS["Nehalem"].features) - {"sse4_2", "popcnt"} | {"aes"}
    warnings: list[str] = []
    table = CpuOptions("Nehalem", (("+aes", "on"),)).apply(default_cpuid(), "kvm", warnings.append,
                                                           available=host_has)
    assert warnings == ["host doesn't support requested feature: CPUID.01H:ECX.sse4.2 [bit 20]",
                        "host doesn't support requested feature: CPUID.01H:ECX.popcnt [bit 23]"]
    assert not table.has("sse4_2") and not table.has("popcnt") and table.has("aes") and table.has("sse4_1")
    with pytest.raises(ConfigError, match=r"host doesn't support requested feature: CPUID.01H:ECX.sse4.2"):
        CpuOptions("Nehalem", (("enforce", "on"),)).apply(default_cpuid(), "kvm", available=host_has)
    warnings.clear()
    maximum = CpuOptions("max").apply(default_cpuid(), "kvm", warnings.append, available=host_has)
    assert warnings == [] and maximum.features() - {"hypervisor"} <= host_has
    assert not maximum.has("sse4_2")
