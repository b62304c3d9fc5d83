"""The cffi declarations in accel/kvm/abi.py against the system's <linux/kvm.h>: every structure size, every
field offset pyemu uses, and every ioctl number, compared with what the C compiler computes from the real
header. Needs gcc and the kernel headers (not /dev/kvm)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from pyemu.accel.kvm import abi
from pyemu.accel.kvm.abi import ffi

STRUCTS = [
    "kvm_regs", "kvm_segment", "kvm_dtable", "kvm_sregs", "kvm_fpu", "kvm_msr_entry", "kvm_msrs",
    "kvm_msr_list", "kvm_cpuid_entry2", "kvm_cpuid2", "kvm_lapic_state", "kvm_vcpu_events", "kvm_xsave",
    "kvm_xcr", "kvm_xcrs", "kvm_debugregs", "kvm_userspace_memory_region", "kvm_irq_routing_entry",
    "kvm_irq_routing", "kvm_msi", "kvm_irqfd", "kvm_ioeventfd", "kvm_mp_state", "kvm_enable_cap",
    "kvm_interrupt", "kvm_clock_data",
]

FIELDS = [
    ("kvm_run", "immediate_exit"), ("kvm_run", "exit_reason"), ("kvm_run", "ready_for_interrupt_injection"),
    ("kvm_run", "if_flag"), ("kvm_run", "cr8"), ("kvm_run", "apic_base"), ("kvm_run", "io.port"),
    ("kvm_run", "io.direction"), ("kvm_run", "io.size"), ("kvm_run", "io.count"), ("kvm_run", "io.data_offset"),
    ("kvm_run", "mmio.phys_addr"), ("kvm_run", "mmio.data"), ("kvm_run", "mmio.len"), ("kvm_run", "mmio.is_write"),
    ("kvm_run", "internal.suberror"), ("kvm_run", "internal.ndata"), ("kvm_run", "internal.data"),
    ("kvm_run", "system_event.type"), ("kvm_run", "system_event.ndata"), ("kvm_run", "system_event.data"),
    ("kvm_run", "fail_entry.hardware_entry_failure_reason"), ("kvm_run", "fail_entry.cpu"),
    ("kvm_run", "msr.index"), ("kvm_run", "msr.data"), ("kvm_run", "eoi.vector"), ("kvm_run", "kvm_valid_regs"),
    ("kvm_run", "s"),
    ("kvm_sregs", "tr"), ("kvm_sregs", "gdt"), ("kvm_sregs", "efer"), ("kvm_sregs", "apic_base"),
    ("kvm_sregs", "interrupt_bitmap"), ("kvm_segment", "unusable"), ("kvm_fpu", "xmm"), ("kvm_fpu", "mxcsr"),
    ("kvm_vcpu_events", "sipi_vector"), ("kvm_vcpu_events", "smi"), ("kvm_vcpu_events", "triple_fault"),
    ("kvm_vcpu_events", "exception_payload"), ("kvm_irq_routing_entry", "u"), ("kvm_ioeventfd", "flags"),
    ("kvm_enable_cap", "args"), ("kvm_msrs", "entries"), ("kvm_cpuid2", "entries"),
]

IOCTLS = sorted(name for name in abi.IOCTL_NAMES.values())


def _c_values(tmp_path) -> dict[str, int]:
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/kvm.h>", "int main(void) {"]
    for name in STRUCTS + ["kvm_run"]:
        lines.append(f'printf("sizeof {name} %zu\\n", sizeof(struct {name}));')
    for struct, field in FIELDS:
        lines.append(f'printf("offsetof {struct}.{field} %zu\\n", offsetof(struct {struct}, {field}));')
    for name in IOCTLS:
        lines.append(f'printf("ioctl {name} %lu\\n", (unsigned long){name});')
    lines.append("return 0; }")
    source = tmp_path / "kvm_abi.c"
    source.write_text("\n".join(lines))
    binary = tmp_path / "kvm_abi"
    subprocess.run(["gcc", "-o", str(binary), str(source)], check=True, capture_output=True, timeout=60)
    output = subprocess.run([str(binary)], check=True, capture_output=True, text=True, timeout=10).stdout
    return {" ".join(line.split()[:2]): int(line.split()[2]) for line in output.splitlines()}


@pytest.fixture(scope="module")
def c_values(tmp_path_factory):
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed: cannot compile the <linux/kvm.h> layout probe")
    try:
        return _c_values(tmp_path_factory.mktemp("kvm_abi"))
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot compile against <linux/kvm.h>: {exc.stderr.decode()[:200]}")


@pytest.mark.parametrize("name", STRUCTS)
def test_structure_sizes_match_the_header(c_values, name):
    assert ffi.sizeof(f"struct {name}") == c_values[f"sizeof {name}"]


def test_kvm_run_covers_the_header_up_to_the_sync_regs(c_values):
    # The sync-regs union is declared as its 2048-byte padding only; everything before it must match.
    assert ffi.sizeof("struct kvm_run") == c_values["sizeof kvm_run"]


@pytest.mark.parametrize("struct,field", FIELDS)
def test_field_offsets_match_the_header(c_values, struct, field):
    assert ffi.offsetof(f"struct {struct}", *field.split(".")) == c_values[f"offsetof {struct}.{field}"]


@pytest.mark.parametrize("name", IOCTLS)
def test_ioctl_numbers_match_the_header(c_values, name):
    assert getattr(abi, name) == c_values[f"ioctl {name}"]


def test_ioctl_numbers_are_distinct():
    numbers = [getattr(abi, name) for name in IOCTLS]
    assert len(set(numbers)) == len(numbers)


def test_run_loop_struct_formats_match_the_cffi_layout():
    """The run loop decodes io/mmio exits with struct at cffi-computed offsets; the formats must agree."""
    import struct

    from pyemu.accel.kvm import vcpu

    def offsets(fmt: str) -> list[int]:
        out, position = [], 0
        for code in struct.Struct(fmt).format.lstrip("<").replace("8s", "s"):
            out.append(position)
            position += 8 if code == "s" else struct.calcsize(code)
        return out

    base = ffi.offsetof("struct kvm_run", "io")
    io_fields = ("direction", "size", "port", "count", "data_offset")
    assert [ffi.offsetof("struct kvm_run", "io", f) - base for f in io_fields] == offsets(vcpu._IO_EXIT.format)
    mmio_fields = ("phys_addr", "data", "len", "is_write")
    assert [ffi.offsetof("struct kvm_run", "mmio", f) - base for f in mmio_fields] == offsets(
        vcpu._MMIO_EXIT.format
    )
    assert vcpu._MMIO_DATA_AT == ffi.offsetof("struct kvm_run", "mmio", "data")
