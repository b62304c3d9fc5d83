"""Mapped RAM (QEMU 9's ``mapped-ram`` capability): a ``file:`` save puts RAM at fixed page-aligned offsets
(zero pages as holes), and a restore maps the file copy-on-write instead of reading it.

The guest program fills 24 MiB with a pattern derived from each address, then loops checking the first
and last word of every page and counting (in RAM and in EBX); any mismatch ends the VM with status 0xab.
Laziness is checked structurally, not by timing: during a mapped restore this process reads (``rchar`` of
/proc/self/io) far less than the 24 MiB of data while an ordinary restore reads all of it, the RAM is a
private mapping of the saved file (/proc/self/smaps) with almost nothing resident until the guest runs,
and the guest's writes never reach the file.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

import pyemu
from pyemu.migration.errors import MigrationError, StreamCorrupt, StreamError, StreamMismatch, StreamTruncated
from pyemu.migration.mapped_ram import ALIGN
from pyemu.migration.stream import Kind, Section, StreamReader, StreamWriter
from pyemu.migration.vmstate import load_vm
from pyemu.system.runstate import RunState
from pyemu.target.x86.boot.synthetic import make_multiboot_binary
from pyemu.testing.asm import assemble

from migration_programs import COUNTER_ADDR, ENTRY
from test_migration_guest import counter, machine_of, stop_vm, wait_counting, wait_migration
from test_migration_kvm import kvm_usable  # noqa: F401  (a fixture)

KVM_TIMEOUT = 300.0
MiB = 1 << 20
RAM = 64 * MiB
BUF = 0x400000
BUF_SIZE = 24 * MiB
PATTERN = 0xA5A5A5A5
BASE = ("-m", "64", "-accel", "tcg", "-serial", "none", "-device", "isa-debug-exit")

MEMCHECK_SOURCE = f"""
    mov edi, {BUF:#x}
fill:
    mov eax, edi
    xor eax, {PATTERN:#x}
    mov [edi], eax
    add edi, 4
    cmp edi, {BUF + BUF_SIZE:#x}
    jb fill
    mov esi, {COUNTER_ADDR:#x}
    xor ebx, ebx
    mov dword ptr [esi], 0
again:
    mov edi, {BUF:#x}
check:
    mov eax, edi
    xor eax, {PATTERN:#x}
    cmp [edi], eax
    jne fail
    mov eax, edi
    add eax, 0xffc
    mov edx, eax
    xor edx, {PATTERN:#x}
    cmp [eax], edx
    jne fail
    add edi, 0x1000
    cmp edi, {BUF + BUF_SIZE:#x}
    jb check
    inc dword ptr [esi]
    inc ebx
    cmp [esi], ebx
    jne fail
    jmp again
fail:
    mov dx, 0xf4
    mov al, 0x55
    out dx, al
spin:
    jmp spin
"""


def enable_mapped_ram(vm: pyemu.VM) -> None:
    vm.execute("migrate-set-capabilities", {"capabilities": [{"capability": "mapped-ram", "state": True}]})


def rchar() -> int:
    """Bytes this process read with read()-like calls (page faults on a mapping do not count)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def mapping_of(address: int) -> tuple[str, str, int]:
    """(permissions, path, Rss bytes) of the mapping of this process that holds ``address``."""
    current: tuple[str, str] | None = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            start, end = (int(x, 16) for x in head[0].split("-"))
            current = (head[1], head[5] if len(head) > 5 else "") if start <= address < end else None
        elif current is not None and head[0] == "Rss:":
            return current[0], current[1], int(head[1]) * 1024
    raise AssertionError(f"no mapping holds {address:#x}")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("memcheck") / "memcheck.bin"
    path.write_bytes(make_multiboot_binary(assemble(MEMCHECK_SOURCE, address=ENTRY, bits=32)))
    return path


@pytest.fixture(scope="module")
def saved(kernel: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, Any]]]:
    """The memcheck guest saved with mapped-ram after a few rounds of checks, and what it was then."""
    state_file = tmp_path_factory.mktemp("mapped") / "vm.state"
    vm = pyemu.VM("-kernel", str(kernel), *BASE)
    vm.start()
    try:
        wait_counting(vm, 3)
        enable_mapped_ram(vm)
        vm.execute("migrate", {"uri": f"file:{state_file}"})
        info = wait_migration(vm)
        assert info["status"] == "completed", info
        assert vm.state is RunState.POSTMIGRATE
        machine = machine_of(vm)
        expected = {"counter": counter(vm), "rbx": machine.vcpus[0].save_state().regs["rbx"],
                    "ram": machine.memory.read(0, RAM), "info": info}
    finally:
        assert stop_vm(vm) == 0  # its checks never failed before the save
    yield state_file, expected


@pytest.fixture
def target(kernel: Path) -> Iterator[pyemu.VM]:
    vm = pyemu.VM("-kernel", str(kernel), *BASE, "-incoming", "defer")
    vm.start()
    yield vm
    vm.quit()
    vm.wait(60)
    vm.close()


def sections_of(path: Path) -> tuple[list[Section], int]:
    with open(path, "rb") as source:
        reader = StreamReader(source)
        return list(reader), reader.bytes_read


def rewrite_stream(path: Path, out: Path, parts: list[Section]) -> None:
    """``path``'s file with its stream part replaced by ``parts`` (valid framing and checksums) and its RAM
    bytes where they were (the new stream must fit before the first region)."""
    data = io.BytesIO()
    writer = StreamWriter(data)
    for part in parts:
        writer.section(part.kind, part.id, part.payload)
    writer.finish()
    raw = bytearray(path.read_bytes())
    assert len(data.getvalue()) < ALIGN
    raw[:ALIGN] = data.getvalue().ljust(ALIGN, b"\0")
    out.write_bytes(bytes(raw))


def assert_untouched(vm: pyemu.VM) -> None:
    """A refused load leaves zeroed RAM backed by the VM's own memory, nothing mapped from a file."""
    machine = machine_of(vm)
    assert machine.memory._file_backed == {}
    assert machine.memory.read(0, RAM) == bytes(RAM)
    assert vm.state is RunState.INMIGRATE


# -- the file -------------------------------------------------------------------------------------------------
def test_save_puts_ram_at_aligned_offsets_with_zero_pages_as_holes(saved: tuple[Path, dict[str, Any]]) -> None:
    state_file, expected = saved
    parts, stream_end = sections_of(state_file)
    mapped = [p for p in parts if p.kind is Kind.MAPPED_RAM]
    assert mapped and not [p for p in parts if p.kind is Kind.RAM]
    gpa, size, offset, file_size = struct.unpack("<QQQQ", mapped[0].payload)
    assert (gpa, size) == (0, RAM)
    assert offset % ALIGN == 0 and offset >= stream_end
    assert state_file.stat().st_size == file_size == offset + size
    with open(state_file, "rb") as f:
        f.seek(offset)
        assert f.read(size) == expected["ram"]
    # Sparse: 24 MiB of pattern (and the program) are allocated, not the 40 MiB of zero pages.
    allocated = state_file.stat().st_blocks * 512
    assert BUF_SIZE <= allocated < BUF_SIZE + 4 * MiB, allocated
    ram = expected["info"]["ram"]
    assert ram["total"] == RAM
    assert ram["normal-bytes"] >= BUF_SIZE and ram["duplicate"] * 4096 + ram["normal-bytes"] == RAM


def test_capability_is_listed_and_needs_a_file_uri(kernel: Path) -> None:
    vm = pyemu.VM("-kernel", str(kernel), *BASE)
    vm.start()
    try:
        caps = {c["capability"]: c["state"] for c in vm.execute("query-migrate-capabilities")}
        assert caps["mapped-ram"] is False
        enable_mapped_ram(vm)
        caps = {c["capability"]: c["state"] for c in vm.execute("query-migrate-capabilities")}
        assert caps["mapped-ram"] is True
        for uri in ("exec:cat > /dev/null", "unix:/tmp/pyemu-mapped-nowhere.sock"):
            with pytest.raises(pyemu.CommandError, match=r"seekable transport \(e\.g\. file\)"):
                vm.execute("migrate", {"uri": uri})
        assert vm.state is RunState.RUNNING
        # A target that cannot be written: the save fails, the VM runs on, nothing is left behind.
        vm.execute("migrate", {"uri": "file:/nonexistent-dir/vm.state"})
        info = wait_migration(vm)
        assert info["status"] == "failed" and "No such file or directory" in info["error-desc"], info
        assert vm.state is RunState.RUNNING
    finally:
        assert stop_vm(vm) == 0


# -- lazy restore ---------------------------------------------------------------------------------------------
def test_restore_maps_the_file_instead_of_reading_it(saved: tuple[Path, dict[str, Any]], kernel: Path) -> None:
    state_file, expected = saved
    before_digest = digest(state_file)
    target = pyemu.VM("-kernel", str(kernel), *BASE, "-incoming", "defer", "-S")
    target.start()
    try:
        check_lazy_restore(target, state_file, before_digest, expected, kernel)
    finally:
        assert stop_vm(target) == 0  # never 0xab: every memory check passed after the restore


def check_lazy_restore(target: pyemu.VM, state_file: Path, before_digest: str, expected: dict[str, Any],
                       kernel: Path) -> None:
    machine = machine_of(target)
    region = machine.memory.regions[0]
    address = machine.memory.host_address(region)

    read_before = rchar()
    target.execute("migrate-incoming", {"uri": f"file:{state_file}"})
    assert wait_migration(target)["status"] == "completed"
    assert target.state is RunState.PAUSED  # -S
    read = rchar() - read_before
    assert read < 2 * MiB, f"the mapped restore read {read} bytes"
    perms, path, rss = mapping_of(address)
    assert path == str(state_file) and perms.endswith("p"), (perms, path)  # a private mapping of the file
    assert rss < 2 * MiB, f"{rss} bytes of RAM resident before the guest ran"

    target.resume()
    wait_counting(target, expected["counter"] + 2)  # two full rounds: every page of the buffer checked
    assert mapping_of(address)[2] >= BUF_SIZE  # the guest's reads faulted the pattern in from the file
    assert machine.memory.read(BUF, 4096) == expected["ram"][BUF:BUF + 4096]
    target.pause()
    assert machine.vcpus[0].save_state().regs["rbx"] == counter(target)  # register and RAM agree
    assert digest(state_file) == before_digest  # the guest's writes stayed private

    # The control: the same state saved as an ordinary stream is read in full by its restore.
    plain = state_file.with_name("plain.state")
    target.execute("migrate", {"uri": f"file:{plain}"})
    assert wait_migration(target)["status"] == "completed"
    other = pyemu.VM("-kernel", str(kernel), *BASE, "-incoming", "defer")
    other.start()
    try:
        read_before = rchar()
        with open(plain, "rb") as source:
            load_vm(machine_of(other), source)
        assert rchar() - read_before >= BUF_SIZE
    finally:
        assert stop_vm(other) == 0


def test_incoming_on_the_command_line_runs_on_with_every_check_passing(
        saved: tuple[Path, dict[str, Any]], kernel: Path) -> None:
    """Firecracker-style: a new process given ``-incoming file:`` runs the guest from the mapped file."""
    state_file, expected = saved
    vm = pyemu.VM("-kernel", str(kernel), *BASE, "-incoming", f"file:{state_file}")
    vm.start()
    try:
        assert vm.state is RunState.RUNNING  # the source was running and no -S: QEMU runs it
        assert counter(vm) >= expected["counter"]
        wait_counting(vm, expected["counter"] + 3)
        assert machine_of(vm).memory._file_backed
    finally:
        assert stop_vm(vm) == 0  # never 0xab: every memory check passed after the restore


def test_saving_again_over_the_mapped_file_keeps_the_running_vm_intact(
        saved: tuple[Path, dict[str, Any]], kernel: Path, tmp_path: Path) -> None:
    """A VM running from ``vm.state`` saves to ``vm.state`` again, plain and mapped: the save goes to a new
    file (the old one, still mapped, is not truncated under the guest), and both saves restore."""
    state_file, expected = saved
    own = tmp_path / "own.state"
    own.write_bytes(state_file.read_bytes())
    vm = pyemu.VM("-kernel", str(kernel), *BASE, "-incoming", f"file:{own}")
    vm.start()
    try:
        wait_counting(vm, expected["counter"] + 1)
        for mapped in (False, True):
            if mapped:
                enable_mapped_ram(vm)
            vm.execute("migrate", {"uri": f"file:{own}"})
            assert wait_migration(vm)["status"] == "completed"
            vm.execute("cont")
            wait_counting(vm, counter(vm) + 1)  # still running from its mapping, checks passing
        saved_counter = counter(vm)
    finally:
        assert stop_vm(vm) == 0
    again = pyemu.VM("-kernel", str(kernel), *BASE, "-incoming", f"file:{own}")
    again.start()
    try:
        assert counter(again) >= expected["counter"]
        wait_counting(again, counter(again) + 1)
        assert saved_counter > expected["counter"]
    finally:
        assert stop_vm(again) == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


# -- refusals -------------------------------------------------------------------------------------------------
def test_truncated_and_extended_files_are_refused_before_mapping(saved: tuple[Path, dict[str, Any]],
                                                                 target: pyemu.VM, tmp_path: Path) -> None:
    state_file, _ = saved
    data = state_file.read_bytes()
    machine = machine_of(target)
    cases: list[tuple[bytes, type[StreamError], str]] = [
        (data[:len(data) - 4096], StreamTruncated, "its RAM needs"),
        (data[:ALIGN + 5 * MiB], StreamTruncated, "its RAM needs"),
        (data + b"\0" * 4096, StreamCorrupt, "sections describe"),
        (data[:200], StreamTruncated, "the stream ends inside"),
    ]
    for content, error, message in cases:
        bad = tmp_path / "bad.state"
        bad.write_bytes(content)
        with open(bad, "rb") as source, pytest.raises(error, match=message):
            load_vm(machine, source)
        assert_untouched(target)


def test_damaged_mapped_ram_sections_are_refused(saved: tuple[Path, dict[str, Any]], target: pyemu.VM,
                                                 tmp_path: Path) -> None:
    state_file, _ = saved
    parts, _ = sections_of(state_file)
    index = next(i for i, p in enumerate(parts) if p.kind is Kind.MAPPED_RAM)
    gpa, size, offset, file_size = struct.unpack("<QQQQ", parts[index].payload)
    machine = machine_of(target)

    def with_entry(*entry: int) -> list[Section]:
        changed = list(parts)
        changed[index] = Section(Kind.MAPPED_RAM, parts[index].id, struct.pack("<QQQQ", *entry))
        return changed

    cases = [
        (with_entry(gpa, size, offset + 1, file_size), "page-aligned"),
        (with_entry(gpa, size, offset, offset + size - 4096), "does not fit"),
        (with_entry(gpa + 4096, size, offset, file_size), "not a RAM region of this VM"),
        (with_entry(gpa, size, 0, file_size), "inside the stream"),
        (parts + [parts[index]], "appears twice"),
        (parts[:index] + [Section(Kind.RAM, "", struct.pack("<Q", 0) + bytes(4096))] + parts[index:],
         "carries RAM data"),
    ]
    for changed, message in cases:
        bad = tmp_path / "bad.state"
        rewrite_stream(state_file, bad, changed)
        with open(bad, "rb") as source, pytest.raises(StreamCorrupt, match=message):
            load_vm(machine, source)
        assert_untouched(target)

    raw = bytearray(state_file.read_bytes())
    raw[300] ^= 0x40  # inside the stream part: its checksum fails
    bad = tmp_path / "flipped.state"
    bad.write_bytes(bytes(raw))
    with open(bad, "rb") as source, pytest.raises(StreamCorrupt, match="checksum"):
        load_vm(machine, source)
    assert_untouched(target)


def test_mapped_stream_needs_a_file_and_a_matching_vm(saved: tuple[Path, dict[str, Any]], target: pyemu.VM,
                                                      kernel: Path) -> None:
    state_file, _ = saved
    with pytest.raises(MigrationError, match="only be loaded from a file: URI"):
        load_vm(machine_of(target), io.BytesIO(state_file.read_bytes()))
    assert_untouched(target)
    target.execute("migrate-incoming", {"uri": f"exec:cat {state_file}"})
    deadline = time.monotonic() + 60
    while (info := target.execute("query-migrate")).get("status") not in ("failed", "completed"):
        assert time.monotonic() < deadline, info
        time.sleep(0.05)
    assert info["status"] == "failed" and "file: URI" in info["error-desc"], info
    assert_untouched(target)

    smaller = pyemu.VM("-kernel", str(kernel), "-m", "32", *BASE[2:], "-incoming", "defer")
    smaller.start()
    try:
        with open(state_file, "rb") as source, pytest.raises(StreamMismatch, match="RAM differs"):
            load_vm(machine_of(smaller), source)
        assert machine_of(smaller).memory._file_backed == {}
    finally:
        smaller.quit()
        smaller.wait(60)
        smaller.close()


def test_reset_after_a_mapped_restore_returns_ram_to_the_vm(saved: tuple[Path, dict[str, Any]],
                                                            target: pyemu.VM) -> None:
    """Clearing RAM (reset, or a load starting over) drops the file mapping: RAM is the VM's own again."""
    state_file, _ = saved
    machine = machine_of(target)
    with open(state_file, "rb") as source:
        load_vm(machine, source)
    address = machine.memory.host_address(machine.memory.regions[0])
    assert mapping_of(address)[1] == str(state_file)
    machine.memory.clear()
    assert machine.memory._file_backed == {}
    assert mapping_of(address)[1] != str(state_file)
    assert machine.memory.read(BUF, 4096) == bytes(4096)
    assert os.path.exists(state_file)


# -- KVM ------------------------------------------------------------------------------------------------------
@pytest.mark.kvm
@pytest.mark.slow
def test_mapped_restore_under_kvm(kvm_usable: None, kernel: Path, tmp_path: Path) -> None:
    """The same under KVM: the memory slot keeps its userspace address while the pages under it become
    the file's (KVM's MMU notifiers drop the old translations), and the guest checks every page. Slow on
    our (nested) hosts: the guest's first touch of each page exits to the host, ~1 min for 24 MiB."""
    kvm = tuple("kvm" if word == "tcg" else word for word in BASE)
    state_file = tmp_path / "kvm.state"
    vm = pyemu.VM("-kernel", str(kernel), *kvm)
    vm.start()
    try:
        wait_counting(vm, 1, KVM_TIMEOUT)
        enable_mapped_ram(vm)
        vm.execute("migrate", {"uri": f"file:{state_file}"})
        assert wait_migration(vm)["status"] == "completed"
        saved_counter = counter(vm)
    finally:
        assert stop_vm(vm) == 0
    before = digest(state_file)
    vm = pyemu.VM("-kernel", str(kernel), *kvm, "-incoming", f"file:{state_file}")
    vm.start()
    try:
        machine = machine_of(vm)
        assert mapping_of(machine.memory.host_address(machine.memory.regions[0]))[1] == str(state_file)
        wait_counting(vm, saved_counter + 2, KVM_TIMEOUT)
    finally:
        assert stop_vm(vm) == 0  # no memory check failed under KVM either
    assert digest(state_file) == before
