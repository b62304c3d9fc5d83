"""What a VM's state is made of, written into a stream from a stopped machine and applied to a fresh one.

Saving (:func:`save_vm`) writes, in order: the header (the machine's identity: board, the board options
that shape its devices, RAM layout, vCPU count, accelerator, the device list with each state's class and
version, and the run state it was in), the virtual clock and guest TSC, one section per vCPU
(:class:`~pyemu.target.x86.cpu_state.X86CpuState`; under KVM it carries the in-kernel LAPIC page), one
section per stateful device in creation order (under TCG the userspace LAPICs are devices), then RAM in
chunks of at most :data:`~pyemu.migration.stream.RAM_CHUNK` bytes with all-zero pages skipped.

Loading (:func:`load_vm`) is two-phase so a bad stream never leaves a half-restored VM behind: every
section is checked (framing, checksum, decoding against the state classes, identity against this machine,
CPU register ranges, RAM addresses) while RAM is written into the *stopped, not yet run* destination; only
when the end marker has been read are the clock, TSC, devices and vCPUs set. Any failure clears RAM and
resets the devices again, so the destination holds nothing of the stream and cannot run it. A stream saved
under the other accelerator (KVM <-> the software CPU) is converted after reading and before anything is
applied (:mod:`pyemu.migration.cross_accel`: the userspace LAPIC devices <-> KVM's LAPIC page in the vCPUs).

Devices whose state is not complete enough to move are refused up front by :func:`migration_blockers`
(QEMU's migration blockers), naming the device; virtio devices that may move are drained first
(:func:`drain_io`), so only ring indices and registers have to travel.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field, fields, is_dataclass
from typing import IO, TYPE_CHECKING, Any

from pyemu.hw.core.state import StateError
from pyemu.migration import codec, mapped_ram
from pyemu.migration.errors import (MigrationBlocked, MigrationError, StreamCorrupt, StreamError,
                                    StreamMismatch)
from pyemu.migration.ram_scan import changed_runs, populated_chunks
from pyemu.migration.stream import RAM_CHUNK, Kind, Section, StreamReader, StreamWriter, Writable
from pyemu.target.x86.cpu_state import GPR_NAMES, LAPIC_PAGE_SIZE, X86CpuState

if TYPE_CHECKING:
    from pyemu.machines.base import Machine

PAGE = 4096
_ZERO_CHUNK = bytes(RAM_CHUNK)
_U64 = (1 << 64) - 1
_RAM_ADDR = struct.Struct("<Q")
DRAIN_TIMEOUT_S = 10.0

MIGRATABLE_DRIVERS = frozenset({
    "apic", "apic-bus", "ioapic", "i8259", "isa-pit", "mc146818rtc", "i8042", "debug-port", "acpi-ged",
    "isa-serial", "isa-debug-exit", "pvpanic", "virtio-blk-device", "virtio-rng-device", "virtio-net-device"})
"""Drivers whose saved state is the whole guest-visible state (virtio ones once drained; virtio-net moves
no frame while the VM is stopped)."""
_BLOCK_REASONS = {
    "vhost-vsock-device": "host socket connections cannot move with the VM yet",
    "virtio-serial-device": "port state and chardev-side buffers are not saved yet",
}


@dataclass
class LoadStats:
    """What a load or a save moved (query-migrate's ``ram`` numbers)."""

    ram_total: int = 0
    ram_bytes: int = 0
    normal_pages: int = 0
    zero_pages: int = 0
    stream_bytes: int = 0
    dirty_sync_count: int = 0
    """Pre-copy: how many times the dirty set was taken (1 for a stop-and-copy)."""
    remaining: int = 0
    """Pre-copy: RAM bytes found dirty by the last sync, still to send."""
    precopy_bytes: int = 0
    """Stream bytes written while the VM ran."""
    downtime_bytes: int = 0
    """Stream bytes written while the VM was stopped (the final stop-and-copy)."""
    expected_downtime_ms: int = 0


# -- identity -----------------------------------------------------------------------------------------------
def identity(machine: Machine) -> dict[str, Any]:
    """The facts a stream and a destination must agree on (JSON-able). Device entries carry the state
    class and version the device writes, so a stream from a pyemu with other layouts is refused by name."""
    devices: list[list[Any]] = []
    for device in machine.devices:
        state = device.state()
        devices.append([device.id, device.driver,
                        codec.qualified_name(type(state)) if state is not None else None,
                        state.version if state is not None else None])
    board = machine.migration_identity()
    return {"board": board["board"], "options": board["options"],
            "ram_layout": [[r.gpa, r.size] for r in machine.memory.regions],
            "vcpus": machine.vcpu_count, "accel": machine.accel.name, "devices": devices}


def _describe(devices: list[list[Any]]) -> str:
    return ", ".join(f"{d[0]}({d[1]})" for d in devices[:12])


def check_identity(saved: Any, own: dict[str, Any]) -> None:
    """StreamMismatch naming the first difference between a stream's header and this machine."""
    if not isinstance(saved, dict):
        raise StreamCorrupt("the header is not an object", "section header")
    for key in ("board", "options", "ram_layout", "vcpus", "accel", "devices", "run_state"):
        if key not in saved:
            raise StreamCorrupt(f"the header lacks '{key}'", "section header")
    if saved["board"] != own["board"]:
        raise StreamMismatch(f"the stream is of board {saved['board']!r}, this VM is {own['board']!r}")
    if saved["options"] != own["options"]:
        raise StreamMismatch(f"board options differ: stream {saved['options']}, this VM {own['options']}")
    if saved["ram_layout"] != own["ram_layout"]:
        size = sum(s for _, s in saved["ram_layout"]) if isinstance(saved["ram_layout"], list) and all(
            isinstance(r, list) and len(r) == 2 and isinstance(r[1], int) for r in saved["ram_layout"]) else None
        own_size = sum(s for _, s in own["ram_layout"])
        raise StreamMismatch(f"RAM differs: the stream has {size if size is None else size >> 20} MiB "
                             f"({saved['ram_layout']}), this VM {own_size >> 20} MiB")
    if saved["vcpus"] != own["vcpus"]:
        raise StreamMismatch(f"the stream has {saved['vcpus']} vCPUs, this VM {own['vcpus']}")
    saved_devices, own_devices = saved["devices"], own["devices"]
    if saved["accel"] != own["accel"]:
        # Imported only here: it pulls in KVM's ABI, which restoring on the same accelerator never needs.
        from pyemu.migration import cross_accel

        if saved["accel"] not in cross_accel.ACCELERATORS:
            raise StreamMismatch(f"the stream was saved under -accel {str(saved['accel'])[:20]!r}, this VM "
                                 f"runs {own['accel']}")
        # A stream of the other accelerator converts (pyemu.migration.cross_accel): compare the boards
        # without the devices only one accelerator has (the software CPU's userspace LAPICs).
        saved_devices = cross_accel.board_devices(saved["devices"])
        own_devices = cross_accel.board_devices(own["devices"])
    if saved_devices != own_devices:
        theirs = saved_devices if isinstance(saved_devices, list) else []
        ours = own_devices
        for index in range(max(len(theirs), len(ours))):
            a = theirs[index] if index < len(theirs) else None
            b = ours[index] if index < len(ours) else None
            if a != b:
                raise StreamMismatch(f"devices differ at #{index}: stream {a}, this VM {b} "
                                     f"(this VM: {_describe(ours)})")
    if saved["run_state"] not in ("running", "paused", "prelaunch"):
        raise StreamCorrupt(f"unknown run state {str(saved['run_state'])[:40]!r}", "section header")


# -- blockers and draining ----------------------------------------------------------------------------------
def migration_blockers(machine: Machine) -> list[MigrationBlocked]:
    """Every device that cannot be saved completely yet, as the error to report for it."""
    blockers: list[MigrationBlocked] = []
    for device in machine.devices:
        if device.driver in MIGRATABLE_DRIVERS:
            continue
        reason = _BLOCK_REASONS.get(device.driver, "its state cannot be saved yet")
        blockers.append(MigrationBlocked(device.id, f"{device.driver}: {reason}"))
    return blockers


def drain_io(machine: Machine, timeout: float = DRAIN_TIMEOUT_S) -> None:
    """Finish every virtio request in flight and flush the disks (the vCPUs are already stopped, so no
    new request can arrive). Each I/O thread runs a queue's requests to completion in one handler, so
    two barriers through each thread's call queue are enough: a kick seen before the first barrier is
    served in the same loop iteration as the second at the latest. Then every drive is flushed."""
    import threading

    for thread in machine.iothreads():
        if not thread.running:
            continue
        for _ in range(2):
            done = threading.Event()
            thread.call_soon(done.set)
            if not done.wait(timeout):
                raise MigrationError(f"iothread {thread.name} did not drain within {timeout:g} s")
    for use in machine.drives():
        try:
            use.backend.flush()
        except Exception as exc:  # the block layer's typed errors, or OSError from the host
            raise MigrationError(f"drive {use.drive_id}: flush before saving failed: {exc}") from exc


# -- saving -------------------------------------------------------------------------------------------------
def save_vm(machine: Machine, out: Writable, run_state: str, stats: LoadStats | None = None) -> LoadStats:
    """Write the whole state of ``machine`` (every vCPU parked, I/O drained) to ``out``."""
    stats = stats or LoadStats()
    writer = begin_stream(machine, out, run_state)
    with machine.lock:
        write_cpu_and_devices(machine, writer)
        _save_ram(machine, writer, stats)
    writer.finish()
    stats.stream_bytes = writer.bytes_written
    stats.downtime_bytes = writer.bytes_written
    stats.dirty_sync_count = 1
    return stats


def begin_stream(machine: Machine, out: Writable, run_state: str) -> StreamWriter:
    """A stream writer on ``out`` with the header (this machine's identity and ``run_state``) written."""
    writer = StreamWriter(out)
    header = identity(machine)
    header["run_state"] = run_state
    writer.section(Kind.HEADER, "", json.dumps(header, separators=(",", ":")).encode())
    return writer


def write_cpu_and_devices(machine: Machine, writer: StreamWriter) -> None:
    """The clock, every vCPU and every stateful device of a stopped machine (caller holds its lock)."""
    clock = {"virtual_ns": machine.clock.now(), "tsc": machine.accel.tsc.value()}
    writer.section(Kind.CLOCK, "", json.dumps(clock).encode())
    for vcpu in machine.vcpus:
        writer.section(Kind.CPU, f"cpu{vcpu.index}", codec.dumps(vcpu.save_state()))
    for device in machine.devices:
        state = device.state()
        if state is not None:
            writer.section(Kind.DEVICE, device.id, codec.dumps(state))


def _save_ram(machine: Machine, writer: StreamWriter, stats: LoadStats) -> None:
    memory = machine.memory
    for region in memory.regions:
        stats.ram_total += region.size
        for gpa, size in populated_chunks(memory, region, stats):
            chunk = memory.read(gpa, size)  # bytes: compares at memcmp speed, a view does not
            if chunk == (_ZERO_CHUNK if size == RAM_CHUNK else bytes(size)):
                stats.zero_pages += size // PAGE
                continue
            send_changed_pages(writer, stats, gpa, chunk, None, count_zero=True)


def send_changed_pages(writer: StreamWriter, stats: LoadStats, gpa: int, chunk: bytes,
                       reference: memoryview | None, *, count_zero: bool = False) -> int:
    """Write the pages of ``chunk`` (RAM read at ``gpa``) that differ from ``reference`` (what the
    destination holds there; None: zeros), a RAM section per run of such pages; ``reference`` is updated
    when it is writable. ``count_zero``: count unchanged pages as zero pages (the first pass over RAM). Returns the
    RAM bytes written."""
    sent = 0
    update = reference is not None and not reference.readonly
    for start, end in changed_runs(chunk, reference):
        data = chunk[start:end]
        writer.section(Kind.RAM, "", _RAM_ADDR.pack(gpa + start) + data)
        if update:
            reference[start:end] = data  # type: ignore[index]
        sent += end - start
    stats.normal_pages += sent // PAGE
    stats.ram_bytes += sent
    if count_zero:
        stats.zero_pages += (len(chunk) - sent) // PAGE
    return sent


# -- loading ------------------------------------------------------------------------------------------------
@dataclass
class _Parsed:
    header: dict[str, Any] = field(default_factory=dict)
    clock: tuple[int, int] | None = None
    cpus: dict[int, X86CpuState] = field(default_factory=dict)
    devices: dict[str, Any] = field(default_factory=dict)
    foreign: dict[str, Any] = field(default_factory=dict)
    """Device sections of the other accelerator's board (converted by pyemu.migration.cross_accel)."""
    mapped: list[mapped_ram.MappedRegion] = field(default_factory=list)
    """MAPPED_RAM sections: RAM to map from the stream's file once everything else checked out."""


def load_vm(machine: Machine, source: IO[bytes], stats: LoadStats | None = None) -> str:
    """Check the stream from ``source`` completely and apply it to ``machine`` (built from the same
    configuration, vCPUs parked, never run since). Returns the run state the source was in. Raises a
    :class:`~pyemu.migration.errors.StreamError` (or MigrationError) and leaves RAM zeroed and the
    devices reset when anything is wrong."""
    stats = stats or LoadStats()
    with machine.lock:
        try:
            machine.memory.clear()  # the boot image loaded at build time; skipped zero pages must read 0
            reader = StreamReader(source)
            parsed = _read_stream(machine, reader, stats)
            if parsed.mapped:  # mapped-ram: RAM is the file's pages, faulted in on first touch
                mapped_ram.map_regions(machine, source, parsed.mapped, reader.bytes_read, stats)
            _apply(machine, parsed)
        except BaseException:
            machine.memory.clear()
            machine.devices.reset_all()
            raise
    return str(parsed.header["run_state"])


def check_header(section: Section, own: dict[str, Any]) -> dict[str, Any]:
    """The stream's first section: the header, as JSON, describing a VM like this one (``own``:
    :func:`identity` of the destination). Raises StreamCorrupt or StreamMismatch."""
    if section.kind is not Kind.HEADER:
        raise StreamCorrupt("the stream does not start with its header", section.where)
    try:
        header = json.loads(section.payload.decode())
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise StreamCorrupt("the header is not valid JSON", section.where) from None
    check_identity(header, own)
    return dict(header)


def _read_stream(machine: Machine, reader: StreamReader, stats: LoadStats) -> _Parsed:
    parsed = _Parsed()
    own = identity(machine)
    stateful = {d[0] for d in own["devices"] if d[2] is not None}
    allowed = codec.state_classes()
    first = True
    foreign: frozenset[str] = frozenset()
    for section in reader:
        if first:
            parsed.header = check_header(section, own)
            if parsed.header.get("accel") != own["accel"]:
                from pyemu.migration import cross_accel

                foreign = cross_accel.foreign_device_ids(parsed.header, own)
            first = False
            continue
        if section.kind is Kind.HEADER:
            raise StreamCorrupt("a second header", section.where)
        if section.kind is Kind.CLOCK:
            if parsed.clock is not None:
                raise StreamCorrupt("a second clock section", section.where)
            parsed.clock = _parse_clock(section)
        elif section.kind is Kind.CPU:
            index = _cpu_index(section, machine.vcpu_count)
            if index in parsed.cpus:
                raise StreamCorrupt("this vCPU's state appears twice", section.where)
            state = codec.loads(section.payload, section.where, {codec.qualified_name(X86CpuState): X86CpuState})
            check_cpu_state(state, section.where)
            parsed.cpus[index] = state
        elif section.kind is Kind.DEVICE and section.id in foreign:
            if section.id in parsed.foreign:
                raise StreamCorrupt("this device's state appears twice", section.where)
            parsed.foreign[section.id] = codec.loads(section.payload, section.where, allowed)
        elif section.kind is Kind.DEVICE:
            if section.id not in stateful:
                raise StreamCorrupt("no such stateful device in this VM", section.where)
            if section.id in parsed.devices:
                raise StreamCorrupt("this device's state appears twice", section.where)
            parsed.devices[section.id] = codec.loads(section.payload, section.where, allowed)
        elif section.kind is Kind.RAM:
            if parsed.mapped:
                raise StreamCorrupt("RAM data in a mapped-ram stream", section.where)
            _load_ram(machine, section, stats)
        elif section.kind is Kind.MAPPED_RAM:
            if stats.ram_bytes:
                raise StreamCorrupt("a mapped-ram section in a stream that carries RAM data", section.where)
            parsed.mapped.append(mapped_ram.parse_section(section, machine, parsed.mapped))
    if first:
        raise StreamCorrupt("the stream has no header")
    if parsed.clock is None:
        raise StreamCorrupt("the stream has no clock section")
    missing_cpus = sorted(set(range(machine.vcpu_count)) - set(parsed.cpus))
    if missing_cpus:
        raise StreamCorrupt(f"the stream lacks the state of vCPU {missing_cpus[0]}")
    if parsed.header["accel"] != own["accel"]:
        from pyemu.migration import cross_accel

        cross_accel.convert(machine, parsed.header["accel"], parsed.cpus, parsed.foreign, parsed.devices)
    missing = [d for d in stateful if d not in parsed.devices]
    if missing:
        raise StreamCorrupt(f"the stream lacks the state of device '{missing[0]}'")
    for device_id, state in parsed.devices.items():
        expected = next(d for d in own["devices"] if d[0] == device_id)
        if codec.qualified_name(type(state)) != expected[2]:
            raise StreamCorrupt(f"holds a {type(state).__name__}, the device keeps a {expected[2]}",
                                f"section device '{device_id}'")
    return parsed


def _parse_clock(section: Section) -> tuple[int, int]:
    try:
        clock = json.loads(section.payload.decode())
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise StreamCorrupt("not valid JSON", section.where) from None
    if not isinstance(clock, dict) or set(clock) != {"virtual_ns", "tsc"}:
        raise StreamCorrupt("expected virtual_ns and tsc", section.where)
    values = (clock["virtual_ns"], clock["tsc"])
    for value in values:
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= _U64:
            raise StreamCorrupt(f"{value!r} is not a 64-bit count", section.where)
    return values


def _cpu_index(section: Section, count: int) -> int:
    text = section.id[3:] if section.id.startswith("cpu") else ""
    if not text.isdigit() or not 0 <= int(text) < count or str(int(text)) != text:
        raise StreamCorrupt(f"this VM has {count} vCPUs", section.where)
    return int(text)


def _load_ram(machine: Machine, section: Section, stats: LoadStats) -> None:
    payload = section.payload
    if len(payload) < 8 + PAGE or (len(payload) - 8) % PAGE:
        raise StreamCorrupt(f"RAM data of {len(payload) - 8} bytes is not whole pages", section.where)
    (gpa,) = _RAM_ADDR.unpack_from(payload)
    size = len(payload) - 8
    if gpa % PAGE or not machine.memory.contains(gpa, size):
        raise StreamCorrupt(f"RAM at {gpa:#x}+{size:#x} is outside this VM's RAM", section.where)
    machine.memory.write(gpa, memoryview(payload)[8:])
    stats.ram_bytes += size
    stats.normal_pages += size // PAGE


def check_cpu_state(state: X86CpuState, where: str) -> None:
    """Register values a vCPU can hold (the accelerators pack them into 64-bit or narrower fields)."""
    def check(name: str, value: int, high: int) -> None:
        if not 0 <= value <= high:
            raise StreamCorrupt(f"{name}={value:#x} is outside 0..{high:#x}", where)

    unknown = set(state.regs) - set(GPR_NAMES)
    if unknown:
        raise StreamCorrupt(f"unknown registers {sorted(unknown)[:4]}", where)
    for name, value in state.regs.items():
        check(name, value, _U64)
    for name in ("rip", "rflags", "cr0", "cr2", "cr3", "cr4", "cr8", "efer"):
        check(name, getattr(state, name), _U64)
    for index, value in state.msrs.items():
        check("msr index", index, 0xFFFFFFFF)
        check(f"msr {index:#x}", value, _U64)
    for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt"):
        seg = getattr(state, name)
        check(f"{name}.selector", seg.selector, 0xFFFF)
        check(f"{name}.base", seg.base, _U64)
        check(f"{name}.limit", seg.limit, 0xFFFFFFFF)
        check(f"{name}.type", seg.type, 0xF)
        check(f"{name}.dpl", seg.dpl, 3)
    for name in ("gdt", "idt"):
        table = getattr(state, name)
        check(f"{name}.base", table.base, _U64)
        check(f"{name}.limit", table.limit, 0xFFFF)
    if state.apic_base is not None:
        check("apic_base", state.apic_base, _U64)
    if state.lapic is not None and len(state.lapic) != LAPIC_PAGE_SIZE:
        raise StreamCorrupt(f"the LAPIC page is {len(state.lapic)} bytes, not {LAPIC_PAGE_SIZE}", where)
    if state.xsave is not None:
        check("xsave.xcr0", state.xsave.xcr0, _U64)
        if len(state.xsave.area) > 1 << 16:
            raise StreamCorrupt("the XSAVE area is larger than 64 KiB", where)
    for part in (state.fpu, state.events):
        if part is not None and is_dataclass(part):
            for f in fields(part):
                value = getattr(part, f.name)
                if isinstance(value, int) and not isinstance(value, bool):
                    check(f.name, value, _U64)


def _apply(machine: Machine, parsed: _Parsed) -> None:
    """Everything was checked: clock and TSC first (device timers are re-armed relative to them), then
    the devices in creation order (interrupt controllers before their users; virtio rings are checked
    against the RAM already loaded), then the vCPUs (which drops translated code of the old RAM)."""
    assert parsed.clock is not None
    virtual_ns, tsc = parsed.clock
    machine.clock.set(virtual_ns)
    machine.set_guest_tsc(tsc)
    for device in machine.devices:
        state = parsed.devices.get(device.id)
        if state is None:
            continue
        try:
            device.from_state(state)
        except StateError as exc:
            raise StreamCorrupt(str(exc), f"section device '{device.id}'") from None
    for vcpu in machine.vcpus:
        vcpu.load_state(parsed.cpus[vcpu.index])
    for device in machine.devices:
        kick = getattr(device.model, "kick_queue", None)
        queues = getattr(device.model, "queues", None)
        if kick is not None and queues is not None:
            for queue in queues:
                if queue.ready:
                    kick(queue.index)  # buffers the guest posted before the save are served now


__all__ = ["LoadStats", "StreamError", "begin_stream", "send_changed_pages", "check_identity", "drain_io", "identity", "load_vm",
           "migration_blockers", "save_vm", "write_cpu_and_devices"]
