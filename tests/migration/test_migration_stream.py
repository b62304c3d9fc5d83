"""The VM-state stream: a round trip restores every device, vCPU, the clock and RAM exactly, and every
kind of damage (bad magic or version, truncation anywhere, flipped bytes, hostile lengths, unknown classes,
ill-typed or out-of-range fields, RAM outside the VM) or mismatch (board options, RAM size, vCPUs,
devices, accelerator) is a typed error that leaves the destination with zeroed RAM, not running, and still
able to load a good stream afterwards."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path
from typing import Iterator

import pytest

import pyemu
from pyemu.migration import codec
from pyemu.migration.errors import (MigrationError, StreamCorrupt, StreamError, StreamFormatError,
                                    StreamMismatch, StreamTruncated)
from pyemu.migration.stream import MAX_PAYLOAD, Kind, Section, StreamReader, StreamWriter
from pyemu.migration.vmstate import identity, load_vm, save_vm
from pyemu.system.runstate import RunState

from migration_programs import COUNTER_ADDR, write_counter_kernel

BASE = ("-m", "32", "-accel", "tcg", "-serial", "none", "-device", "isa-debug-exit")


def machine_of(vm: pyemu.VM):  # type: ignore[no-untyped-def]
    return vm._instance.machine


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_counter_kernel(tmp_path_factory.mktemp("kernel"))


@pytest.fixture(scope="module")
def saved(kernel: Path) -> Iterator[tuple[bytes, dict]]:
    """A stream of the counter guest after it ran a moment, and the source's states for comparison."""
    vm = pyemu.VM("-kernel", str(kernel), *BASE)
    vm.start()
    try:
        machine = machine_of(vm)
        deadline = 200
        while machine.memory.read_u32(COUNTER_ADDR) < 1000 and deadline:
            import time
            time.sleep(0.05)
            deadline -= 1
        vm.pause()
        out = io.BytesIO()
        save_vm(machine, out, "paused")
        expected = {"devices": machine.devices.states(),
                    "cpu": machine.vcpus[0].save_state(), "clock": machine.clock.now(),
                    "tsc": machine.accel.tsc.value(), "ram": machine.memory.read(0, 32 << 20)}
        yield out.getvalue(), expected
    finally:
        vm.quit()
        vm.wait(30)
        vm.close()


@pytest.fixture
def target(kernel: Path) -> Iterator[pyemu.VM]:
    """A destination waiting for a stream (-incoming defer): built, in inmigrate, nothing run."""
    vm = pyemu.VM("-kernel", str(kernel), *BASE, "-incoming", "defer")
    vm.start()
    yield vm
    vm.quit()
    vm.wait(30)
    vm.close()


def sections(data: bytes) -> list[Section]:
    return list(StreamReader(io.BytesIO(data)))


def reframe(parts: list[Section]) -> bytes:
    """A stream with valid framing and checksums around ``parts`` (to reach the checks behind them)."""
    out = io.BytesIO()
    writer = StreamWriter(out)
    for part in parts:
        writer.section(part.kind, part.id, part.payload)
    writer.finish()
    return out.getvalue()


def load(vm: pyemu.VM, data: bytes) -> None:
    load_vm(machine_of(vm), io.BytesIO(data))


def assert_untouched(vm: pyemu.VM) -> None:
    machine = machine_of(vm)
    assert machine.memory.read(0, 32 << 20) == bytes(32 << 20)
    assert vm.state is RunState.INMIGRATE


# -- round trip ---------------------------------------------------------------------------------------------
def test_round_trip_restores_devices_cpu_clock_and_ram(saved: tuple[bytes, dict], target: pyemu.VM) -> None:
    data, expected = saved
    load(target, data)
    machine = machine_of(target)
    assert machine.devices.states() == expected["devices"]
    restored = machine.vcpus[0].save_state()
    for name in ("regs", "rip", "rflags", "cs", "ss", "cr0", "cr3", "cr4", "efer", "gdt", "idt"):
        assert getattr(restored, name) == getattr(expected["cpu"], name), name
    assert machine.clock.now() == expected["clock"]
    assert machine.accel.tsc.value() == expected["tsc"]
    assert machine.memory.read(0, 32 << 20) == expected["ram"]
    assert machine.memory.read_u32(COUNTER_ADDR) >= 1000


def test_a_stream_moves_between_ram_backends(saved: tuple[bytes, dict], kernel: Path) -> None:
    """The source's RAM is anonymous memory (the default); a destination whose RAM is a memfd
    (``-object memory-backend-memfd``) gets the same bytes: the stream carries pages, not the backend."""
    data, expected = saved
    vm = pyemu.VM("-kernel", str(kernel), *BASE, "-object", "memory-backend-memfd,id=mem,size=32M",
                  "-machine", "memory-backend=mem", "-incoming", "defer")
    vm.start()
    try:
        machine = machine_of(vm)
        assert machine.memory.backend == "memfd" and machine.memory.fd >= 0
        load(vm, data)
        assert machine.memory.read(0, 32 << 20) == expected["ram"]
    finally:
        vm.quit()
        vm.wait(30)
        vm.close()


def test_zero_pages_are_skipped_and_sections_bounded(saved: tuple[bytes, dict]) -> None:
    data, _ = saved
    assert len(data) < 1 << 20  # 32 MiB of RAM, almost all zero
    kinds = [s.kind for s in sections(data)]
    assert kinds[0] is Kind.HEADER and kinds[1] is Kind.CLOCK and kinds[2] is Kind.CPU
    assert all(len(s.payload) <= MAX_PAYLOAD[s.kind] for s in sections(data))


def test_header_describes_the_machine(saved: tuple[bytes, dict]) -> None:
    header = json.loads(sections(saved[0])[0].payload)
    assert header["board"] == "microvm" and header["vcpus"] == 1 and header["accel"] == "tcg"
    assert sum(size for _, size in header["ram_layout"]) == 32 << 20
    ids = [d[0] for d in header["devices"]]
    assert "ioapic" in ids and "lapic0" in ids and "isa-debug-exit" in ids
    assert header["run_state"] == "paused"


def test_codec_round_trips_every_state_and_refuses_ill_typed_fields(saved: tuple[bytes, dict]) -> None:
    for state in list(saved[1]["devices"].values()) + [saved[1]["cpu"]]:
        assert codec.loads(codec.dumps(state), "test") == state
    payload = json.loads(codec.dumps(saved[1]["devices"]["ioapic"]))
    for field, bad in (("ioregsel", True), ("ioregsel", "1"), ("redirection", 5), ("nonsense", 1)):
        broken = json.loads(json.dumps(payload))
        broken["fields"][field] = bad
        with pytest.raises(StreamCorrupt):
            codec.loads(json.dumps(broken).encode(), "test")
    with pytest.raises(StreamCorrupt, match="unknown state class"):
        codec.loads(json.dumps({"class": "os.system", "fields": {}}).encode(), "test")
    with pytest.raises(StreamCorrupt):
        codec.loads(b"[" * 100000 + b"]" * 100000, "test")  # deep nesting: bounded, typed
    with pytest.raises(StreamCorrupt):
        codec.loads(b'{"class": "x", "fields": ' + b"9" * 10000 + b"}", "test")  # huge number


# -- damage -------------------------------------------------------------------------------------------------
def test_bad_magic_and_unknown_version(saved: tuple[bytes, dict], target: pyemu.VM) -> None:
    data = saved[0]
    with pytest.raises(StreamFormatError, match="bad magic"):
        load(target, b"QEVM" + data[4:])
    with pytest.raises(StreamFormatError, match="version 2"):
        load(target, data[:8] + struct.pack("<I", 2) + data[12:])
    assert_untouched(target)


def test_truncation_anywhere_is_typed_and_leaves_nothing(saved: tuple[bytes, dict], target: pyemu.VM) -> None:
    data = saved[0]
    cuts = sorted({0, 5, 12, 13, 20, 100, len(data) // 3, len(data) // 2, len(data) - 30, len(data) - 1}
                  | set(range(len(data) - 40, len(data), 7)))
    for cut in cuts:
        with pytest.raises(StreamError) as info:
            load(target, data[:cut])
        assert isinstance(info.value, (StreamTruncated, StreamFormatError)), (cut, info.value)
        assert_untouched(target)


def test_flipped_bytes_fail_their_checksum(saved: tuple[bytes, dict], target: pyemu.VM) -> None:
    data = saved[0]
    for offset in (40, 200, len(data) // 2, len(data) - 20):
        damaged = bytearray(data)
        damaged[offset] ^= 0x40
        with pytest.raises(StreamError):
            load(target, bytes(damaged))
        assert_untouched(target)


def test_hostile_lengths_are_refused_before_reading(saved: tuple[bytes, dict], target: pyemu.VM) -> None:
    header = struct.pack("<8sI", b"PYEMU-VM", 1)
    for kind in (Kind.HEADER, Kind.RAM, Kind.DEVICE):
        hostile = header + struct.pack("<BHII", kind, 0, 0xFFFFFFFF, 0)
        with pytest.raises(StreamCorrupt, match="over the"):
            load(target, hostile)
    with pytest.raises(StreamCorrupt, match="unknown kind"):
        load(target, header + struct.pack("<BHII", 99, 0, 0, 0))
    with pytest.raises(StreamCorrupt, match="id of"):
        load(target, header + struct.pack("<BHII", Kind.DEVICE, 60000, 0, 0))
    assert_untouched(target)


def test_semantic_damage_behind_valid_checksums(saved: tuple[bytes, dict], target: pyemu.VM) -> None:
    parts = sections(saved[0])

    def replace_section(kind: Kind, ident: str, payload: bytes) -> bytes:
        return reframe([Section(p.kind, p.id, payload) if (p.kind, p.id) == (kind, ident) else p for p in parts])

    ioapic = json.loads(next(p.payload for p in parts if p.id == "ioapic"))
    ioapic["fields"]["ioregsel"] = 1 << 40  # well-typed, out of the device's range
    with pytest.raises(StreamCorrupt, match="ioapic"):
        load(target, replace_section(Kind.DEVICE, "ioapic", json.dumps(ioapic).encode()))
    assert_untouched(target)

    cpu = json.loads(next(p.payload for p in parts if p.kind is Kind.CPU))
    cpu["fields"]["rip"] = 1 << 70
    with pytest.raises(StreamCorrupt, match="rip"):
        load(target, replace_section(Kind.CPU, "cpu0", json.dumps(cpu).encode()))

    ram = next(p for p in parts if p.kind is Kind.RAM)
    outside = struct.pack("<Q", 1 << 40) + ram.payload[8:]
    with pytest.raises(StreamCorrupt, match="outside this VM's RAM"):
        load(target, reframe([Section(p.kind, p.id, outside) if p is ram else p for p in parts]))
    with pytest.raises(StreamCorrupt, match="not whole pages"):
        load(target, reframe([Section(p.kind, p.id, p.payload[:100]) if p is ram else p for p in parts]))

    with pytest.raises(StreamCorrupt, match="lacks the state of device"):
        load(target, reframe([p for p in parts if p.id != "ioapic"]))
    with pytest.raises(StreamCorrupt, match="appears twice"):
        load(target, reframe(parts + [next(p for p in parts if p.id == "ioapic")]))
    with pytest.raises(StreamCorrupt, match="a second clock"):
        load(target, reframe(parts + [next(p for p in parts if p.kind is Kind.CLOCK)]))
    with pytest.raises(StreamCorrupt, match="no clock"):
        load(target, reframe([p for p in parts if p.kind is not Kind.CLOCK]))
    with pytest.raises(StreamCorrupt, match="does not start with its header"):
        load(target, reframe(parts[1:]))
    with pytest.raises(StreamCorrupt, match="no such stateful device"):
        load(target, reframe(parts + [Section(Kind.DEVICE, "ghost", b"{}")]))
    out = io.BytesIO()
    writer = StreamWriter(out)
    for part in parts:
        writer.section(part.kind, part.id, part.payload)
    writer.sections += 1  # as if a section was cut out at a section boundary
    writer.finish()
    with pytest.raises(StreamCorrupt, match="end marker counts"):
        load(target, out.getvalue())
    assert_untouched(target)

    load(target, saved[0])  # and the destination still takes a good stream
    assert machine_of(target).memory.read_u32(COUNTER_ADDR) >= 1000


# -- mismatch -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, match", [
    (("-m", "64"), "RAM differs"),
    (("-smp", "2"), "vCPUs"),
    (("-machine", "microvm,pit=off"), "board options"),
    (("-device", "pvpanic"), "devices differ"),
])
def test_other_machine_is_a_mismatch(saved: tuple[bytes, dict], kernel: Path, extra: tuple[str, ...],
                                     match: str) -> None:
    args = list(BASE)
    if extra[0] == "-m":
        args[1] = extra[1]
        extra = ()
    vm = pyemu.VM("-kernel", str(kernel), *args, *extra, "-incoming", "defer")
    vm.start()
    try:
        with pytest.raises(StreamMismatch, match=match):
            load(vm, saved[0])
        assert vm.state is RunState.INMIGRATE
        assert not any(machine_of(vm).memory.read(0, 32 << 20))
    finally:
        vm.quit()
        vm.wait(30)
        vm.close()


def test_identity_names_state_versions(target: pyemu.VM) -> None:
    entry = next(d for d in identity(machine_of(target))["devices"] if d[0] == "ioapic")
    assert entry[1] == "ioapic" and entry[2].endswith("IoApicState") and entry[3] == 1


def test_errors_are_one_typed_tree() -> None:
    for cls in (StreamCorrupt, StreamFormatError, StreamTruncated, StreamMismatch):
        assert issubclass(cls, StreamError) and issubclass(cls, MigrationError)
        assert issubclass(cls, pyemu.errors.PyemuError)


def test_saving_reads_only_populated_ram_and_allocates_none(kernel: Path) -> None:
    """A save skips the memfd's holes without reading them: reading one through the mapping would allocate
    a page (the cost that made pre-copy slow and left the source holding all its RAM). The stream still
    accounts for every page, and a destination gets the same RAM."""
    from pyemu.migration.vmstate import LoadStats

    vm = pyemu.VM("-kernel", str(kernel), *BASE)
    vm.start()
    try:
        machine = machine_of(vm)
        for _ in range(200):
            if machine.memory.read_u32(COUNTER_ADDR) >= 100:
                break
            import time
            time.sleep(0.05)
        vm.pause()
        region = machine.memory.regions[0]
        before = list(machine.memory.populated_spans(region))
        assert 0 < sum(size for _, size in before) < region.size // 4
        stats = LoadStats()
        out = io.BytesIO()
        save_vm(machine, out, "paused", stats)
        assert list(machine.memory.populated_spans(region)) == before
        pages = sum(r.size for r in machine.memory.regions) // 4096
        assert stats.zero_pages + stats.normal_pages == pages and stats.normal_pages > 0
    finally:
        vm.quit()
        vm.wait(30)
        vm.close()
