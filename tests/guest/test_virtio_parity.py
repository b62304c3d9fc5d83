"""One guest program drives virtio-blk and virtio-rng through their virtio-mmio windows, with the same
expectations under the software CPU and under KVM.

The guest is its own virtio driver (a few dozen instructions: status handshake, feature negotiation,
queue set-up, requests, kicks) and sleeps in ``sti; hlt`` until the devices' interrupts wake it. What
differs per accelerator is only the plumbing the board would choose: the QueueNotify writes are bound as
ioeventfds on both (the kick never reaches the transport's Python: under KVM the kernel signals the
notifier, under the software CPU the engine's C window callback does, see accel/tcg/mmio_notify.py), and
the interrupt is a KVM irqfd on an IOAPIC route into the in-kernel LAPIC under KVM, the userspace
controller under the software CPU. Unbound, the software CPU's kick is an MMIO write that the transport
turns into the notifier's signal.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass
from pathlib import Path

from pyemu.accel.exits import Stopped
from pyemu.block.options import DriveOptions, open_drive
from pyemu.hw.core.dma import DmaMemory
from pyemu.hw.core.irq import NotifierInterrupt
from pyemu.hw.virtio.blk import BlkConfig, VirtioBlk
from pyemu.hw.virtio.mmio import VirtioMmio
from pyemu.hw.virtio.rng import EntropySource, RngConfig, VirtioRng
from pyemu.system.iothread import IoThread
from pyemu.testing import FakeInterruptController, GuestProgram, prepared
from pyemu.testing.handlers import exit_with

BLK_BASE = 0xFEB00000
RNG_BASE = 0xFEB00200
BLK_GSI, RNG_GSI = 16, 17
VECTOR = 0x41
COUNTER = 0x48000
SEEN = 0x49000  # the InterruptStatus value the driver read after each request
BLK_RING, RNG_RING = 0x200000, 0x220000
HEADER, DATA, STATUS, READBACK = 0x210000, 0x211000, 0x212000, 0x213000
RNG_BUFFER = 0x230000
PATTERN = 0xA5


_labels = iter(range(1, 1 << 30))


def label() -> str:
    """A fresh assembler label (keystone has no numeric local labels)."""
    return f"L{next(_labels)}"


def setup_queue(base_reg: str, ring: int, size: int) -> str:
    """Queue 0 of the device at ``base_reg``: size, ring addresses, ready."""
    return f"""
        mov dword ptr [{base_reg} + 0x30], 0
        mov dword ptr [{base_reg} + 0x38], {size}
        mov dword ptr [{base_reg} + 0x80], {ring:#x}
        mov dword ptr [{base_reg} + 0x84], 0
        mov dword ptr [{base_reg} + 0x90], {ring + 0x1000:#x}
        mov dword ptr [{base_reg} + 0x94], 0
        mov dword ptr [{base_reg} + 0xa0], {ring + 0x2000:#x}
        mov dword ptr [{base_reg} + 0xa4], 0
        mov dword ptr [{base_reg} + 0x44], 1
    """


def handshake(base_reg: str, fail: int) -> str:
    """Reset, ACKNOWLEDGE|DRIVER, driver features = VERSION_1 only, FEATURES_OK checked."""
    ok = label()
    return f"""
        mov dword ptr [{base_reg} + 0x70], 0
        mov dword ptr [{base_reg} + 0x70], 1
        mov dword ptr [{base_reg} + 0x70], 3
        mov dword ptr [{base_reg} + 0x24], 0
        mov dword ptr [{base_reg} + 0x20], 0
        mov dword ptr [{base_reg} + 0x24], 1
        mov dword ptr [{base_reg} + 0x20], 1
        mov dword ptr [{base_reg} + 0x70], 11
        mov eax, dword ptr [{base_reg} + 0x70]
        test eax, 8
        jnz {ok}
        {exit_with(fail)}
    {ok}:
    """


def descriptor(ring: int, index: int, addr: int, length: int, flags: int, nxt: int) -> str:
    at = ring + 16 * index
    return f"""
        mov rbx, {at:#x}
        mov rax, {addr:#x}
        mov qword ptr [rbx], rax
        mov dword ptr [rbx + 8], {length}
        mov word ptr [rbx + 12], {flags}
        mov word ptr [rbx + 14], {nxt}
    """


def offer_and_wait(base_reg: str, ring: int, slot: int, head: int, interrupts: int) -> str:
    """Put ``head`` in avail slot ``slot``, publish index slot+1, kick, sleep until used index slot+1
    and until the handler has counted ``interrupts`` interrupts (each completion must raise one)."""
    avail, used = ring + 0x1000, ring + 0x2000
    again, done, sleep = label(), label(), label()
    return f"""
        mov rbx, {avail:#x}
        mov word ptr [rbx + {4 + 2 * slot}], {head}
        mov word ptr [rbx + 2], {slot + 1}
        mov dword ptr [{base_reg} + 0x50], 0
    {again}:
        cli
        mov rbx, {used:#x}
        movzx eax, word ptr [rbx + 2]
        cmp eax, {slot + 1}
        jb {sleep}
        mov rbx, {COUNTER:#x}
        mov eax, dword ptr [rbx]
        cmp eax, {interrupts}
        jae {done}
    {sleep}:
        sti
        hlt
        jmp {again}
    {done}:
        mov eax, dword ptr [{base_reg} + 0x60]
        mov rbx, {SEEN + 4 * (interrupts - 1):#x}
        mov dword ptr [rbx], eax
        mov dword ptr [{base_reg} + 0x64], eax
    """


HANDLER = f"""
    push rax
    push rbx
    mov rbx, {COUNTER:#x}
    inc dword ptr [rbx]
    mov rbx, 0xfee000b0
    mov dword ptr [rbx], 0
    pop rbx
    pop rax
    iretq
"""


def guest_program() -> GuestProgram:
    code = f"""
        mov rbx, 0xfee000f0
        mov dword ptr [rbx], 0x1ff
        mov r15, {BLK_BASE:#x}
        mov r14, {RNG_BASE:#x}
        {handshake("r15", 0xE1)}
        {setup_queue("r15", BLK_RING, 8)}
        mov dword ptr [r15 + 0x70], 15
        {handshake("r14", 0xE2)}
        {setup_queue("r14", RNG_RING, 8)}
        mov dword ptr [r14 + 0x70], 15

        ; write sector 2 with the pattern
        mov rdi, {DATA:#x}
        mov al, {PATTERN:#x}
        mov rcx, 512
        cld
        rep stosb
        mov rbx, {HEADER:#x}
        mov dword ptr [rbx], 1
        mov dword ptr [rbx + 4], 0
        mov qword ptr [rbx + 8], 2
        mov rbx, {STATUS:#x}
        mov byte ptr [rbx], 0xff
        {descriptor(BLK_RING, 0, HEADER, 16, 1, 1)}
        {descriptor(BLK_RING, 1, DATA, 512, 1, 2)}
        {descriptor(BLK_RING, 2, STATUS, 1, 2, 0)}
        {offer_and_wait("r15", BLK_RING, 0, 0, 1)}
        mov rbx, {STATUS:#x}
        movzx eax, byte ptr [rbx]
        test eax, eax
        jz ok4
        {exit_with(0xE3)}
    ok4:
        ; read sector 0 (written by the host before the run) into the read-back buffer
        mov rbx, {HEADER:#x}
        mov dword ptr [rbx], 0
        mov qword ptr [rbx + 8], 0
        mov rbx, {STATUS:#x}
        mov byte ptr [rbx], 0xff
        {descriptor(BLK_RING, 1, READBACK, 512, 3, 2)}
        {offer_and_wait("r15", BLK_RING, 1, 0, 2)}
        mov rbx, {STATUS:#x}
        movzx eax, byte ptr [rbx]
        test eax, eax
        jz ok5
        {exit_with(0xE4)}
    ok5:
        ; 64 bytes of entropy
        {descriptor(RNG_RING, 0, RNG_BUFFER, 64, 2, 0)}
        {offer_and_wait("r14", RNG_RING, 0, 0, 3)}
        mov rbx, {RNG_RING + 0x2000 + 4:#x}
        mov eax, dword ptr [rbx + 4]
        cmp eax, 64
        je ok6
        {exit_with(0xE5)}
    ok6:
        {exit_with(0x600D)}
    """
    return GuestProgram(code=code, handlers={VECTOR: HANDLER})


@dataclass
class DeviceRun:
    """What :func:`run_with_devices` saw: the exit value, a copy of guest RAM, the last exit; how many
    QueueNotify writes and InterruptStatus/InterruptACK accesses reached the transports' Python; the
    software CPU's ioeventfd hits and interrupt-status hits (served in C); each transport's InterruptStatus
    at the end; the written guest ranges the DMA layer reported to the accelerator; the virtio-blk requests
    its C data plane served."""

    result: int
    ram: bytes
    last_exit: object
    notify_writes: int
    status_accesses: int
    hits: int
    status_hits: int
    final_status: list[int]
    reported: list[tuple[int, int]]
    plane_served: int


def run_with_devices(program: GuestProgram, accel: str, image: Path, bind: bool = True) -> DeviceRun:
    """Run ``program`` with virtio-blk (on ``image``) and virtio-rng plugged in the way a board would for
    ``accel`` (``bind``: kicks as ioeventfds, and under the software CPU the interrupt status registers
    served in C)."""
    controller = FakeInterruptController() if accel == "tcg" else None
    iothread = IoThread("parity")
    transports: list[VirtioMmio] = []
    reported: list[tuple[int, int]] = []
    with prepared(program, accel, interrupts=controller) as machine:
        try:
            board, accelerator = machine.board, machine.accelerator
            report = getattr(accelerator, "invalidate_code_ranges", None)
            if report is not None:  # record what the DMA layer is told, and pass it on
                def recording(ranges: list[tuple[int, int]], _report=report) -> None:  # type: ignore[no-untyped-def]
                    reported.extend(ranges)
                    _report(ranges)
                accelerator.invalidate_code_ranges = recording  # type: ignore[attr-defined]
            dma = DmaMemory.wired_to(board.memory, accelerator)
            backend = open_drive(DriveOptions.from_props((("file", str(image)), ("format", "raw"), ("id", "d0"))))
            devices = [(BLK_BASE, BLK_GSI, VirtioBlk(backend, BlkConfig(drive_id="d0"))),
                       (RNG_BASE, RNG_GSI, VirtioRng(EntropySource("/dev/urandom"), RngConfig()))]
            for base, gsi, device in devices:
                if accel == "kvm":
                    accelerator.msi_sink().set_ioapic_route(gsi, (0xFEE00000, VECTOR))  # type: ignore[attr-defined]
                    interrupt = NotifierInterrupt(accelerator.irq_notifier(gsi))  # type: ignore[attr-defined]
                else:
                    assert controller is not None
                    interrupt = _VectorInterrupt(controller, VECTOR)
                transport = VirtioMmio(device, dma, interrupt, iothread, name=device.name)
                transports.append(transport)
                board.mmio.register(base, 0x200, transport, device.name, own_lock=True)
                if bind:
                    for offset, value, notifier in transport.queue_notifiers():
                        accelerator.bind_ioeventfd(notifier, base + offset, 4, value)  # type: ignore[attr-defined]
                    bind_status = getattr(accelerator, "bind_interrupt_status", None)
                    if bind_status is not None:
                        offset, word = transport.interrupt_status_word()
                        assert bind_status(base + offset, word)
            iothread.start()
            counts = _count_register_accesses(transports)
            result, ram, last_exit = _run(machine, timeout=20.0)
            table = getattr(accelerator, "_mmio_notifiers", None)
            run = DeviceRun(result, ram, last_exit, counts["notify"], counts["status"],
                            getattr(accelerator, "ioeventfd_hits", 0),
                            table.status_hits if table is not None else 0,
                            [transport.interrupt_status for transport in transports], reported,
                            sum(plane.served for plane in devices[0][2]._planes.values()))  # type: ignore[attr-defined]
        finally:
            iothread.stop()
            for transport in transports:
                transport.close()
            iothread.close()
    return run


def _check_guest_driver(accel: str, tmp_path: Path, bind: bool) -> DeviceRun:
    """Run the guest driver; check what it read and wrote (each InterruptStatus it read says "used
    buffer", and its ACK left every transport's status clear)."""
    image = tmp_path / "disk.img"
    host_sector = bytes(range(256)) * 2
    image.write_bytes(host_sector + bytes(1 << 20))
    run = run_with_devices(guest_program(), accel, image, bind)
    result, ram, last_exit = run.result, run.ram, run.last_exit
    assert result == 0x600D, f"guest exit {result:#x} after {last_exit!r}"
    assert struct.unpack("<3I", ram[SEEN : SEEN + 12]) == (1, 1, 1)
    assert run.final_status == [0, 0]
    disk = image.read_bytes()
    assert disk[2 * 512 : 3 * 512] == bytes([PATTERN]) * 512
    assert ram[READBACK : READBACK + 512] == host_sector
    assert ram[RNG_BUFFER : RNG_BUFFER + 64] != bytes(64)
    interrupts = struct.unpack("<I", ram[COUNTER : COUNTER + 4])[0]
    assert interrupts >= 3  # the guest waited for one per request
    return run


def test_guest_driver_parity(accel: str, tmp_path: Path) -> None:
    run = _check_guest_driver(accel, tmp_path, bind=True)
    assert run.notify_writes == 0, "a queue kick reached the transport although it was bound as an ioeventfd"
    if accel == "tcg":
        assert run.hits == 3  # one kick per request, each signalled by the engine's C callback
        # One InterruptStatus read and one InterruptACK write per request, both served in C.
        assert (run.status_hits, run.status_accesses) == (6, 0)
    else:
        assert run.status_accesses == 6  # KVM exits to the transport's Python for both


def test_unbound_kicks_reach_the_transport(tmp_path: Path) -> None:
    """Without ioeventfds (a board that does not bind them, a full table) the software CPU's kick is an
    ordinary MMIO write the transport serves, and so are the interrupt status registers."""
    run = _check_guest_driver("tcg", tmp_path, bind=False)
    assert (run.notify_writes, run.hits, run.status_accesses, run.status_hits) == (3, 0, 6, 0)


CODE_PAGE = 0x300000
RETURN_1 = bytes([0xB8, 1, 0, 0, 0, 0xC3])  # mov eax, 1; ret
RETURN_2 = bytes([0xB8, 2, 0, 0, 0, 0xC3])  # mov eax, 2; ret


def test_disk_read_over_executed_code_runs_the_new_code(accel: str, tmp_path: Path) -> None:
    """A device writing guest RAM that already ran as code: the next call runs what the disk loaded (the
    software CPU must drop its stale translation; DmaMemory reports the write). One read fills a data
    page and then the code page: under the software CPU the write screen keeps the status byte and the
    data page (no code) from the DMA layer and reports the code page; without a screen (KVM) all three."""
    image = tmp_path / "disk.img"
    image.write_bytes(bytes([0x5A]) * 512 + RETURN_2.ljust(512, b"\x90") + bytes(1 << 20))
    store_code = "\n".join(f"mov byte ptr [rbx + {i}], {b:#x}" for i, b in enumerate(RETURN_1))
    program = GuestProgram(code=f"""
        mov rbx, 0xfee000f0
        mov dword ptr [rbx], 0x1ff
        mov r15, {BLK_BASE:#x}
        {handshake("r15", 0xE1)}
        {setup_queue("r15", BLK_RING, 8)}
        mov dword ptr [r15 + 0x70], 15
        mov rbx, {CODE_PAGE:#x}
        {store_code}
        mov rax, {CODE_PAGE:#x}
        call rax
        mov r12, rax
        mov rbx, {HEADER:#x}
        mov dword ptr [rbx], 0
        mov dword ptr [rbx + 4], 0
        mov qword ptr [rbx + 8], 0
        {descriptor(BLK_RING, 0, HEADER, 16, 1, 1)}
        {descriptor(BLK_RING, 1, DATA, 512, 3, 2)}
        {descriptor(BLK_RING, 2, CODE_PAGE, 512, 3, 3)}
        {descriptor(BLK_RING, 3, STATUS, 1, 2, 0)}
        {offer_and_wait("r15", BLK_RING, 0, 0, 1)}
        mov rax, {CODE_PAGE:#x}
        call rax
        shl r12, 8
        or rax, r12
        {exit_with("eax")}
    """, handlers={VECTOR: HANDLER})
    run = run_with_devices(program, accel, image)
    assert run.result == 0x102, f"guest exit {run.result:#x} after {run.last_exit!r}"
    assert run.ram[DATA : DATA + 512] == bytes([0x5A]) * 512
    if accel == "tcg" and run.plane_served:
        assert run.reported == [(CODE_PAGE, 512), (STATUS, 1)]  # from the first range with code on
    else:
        # KVM has no screen; and the Python path, which serves a request the I/O thread finds only after
        # the C plane looked (a guest that offers it meanwhile, seen on a loaded host), reports everything
        assert sorted(run.reported) == [(DATA, 512), (STATUS, 1), (CODE_PAGE, 512)]


class _VectorInterrupt:
    """Software-CPU plumbing for the test board (no IOAPIC there): an edge raises ``vector``."""

    def __init__(self, controller: FakeInterruptController, vector: int) -> None:
        self._controller, self._vector = controller, vector

    def trigger(self) -> None:
        self._controller.raise_vector(self._vector)


def _count_register_accesses(transports: list[VirtioMmio]) -> dict[str, int]:
    """Counts, live, the QueueNotify writes and the InterruptStatus reads / InterruptACK writes that reach
    the transports' Python."""
    counts = {"notify": 0, "status": 0}
    for transport in transports:
        write, read = transport.write, transport.read

        def counting_write(offset: int, size: int, value: int, _write=write) -> None:  # type: ignore[no-untyped-def]
            if offset == 0x50:
                counts["notify"] += 1
            elif offset == 0x64:
                counts["status"] += 1
            _write(offset, size, value)

        def counting_read(offset: int, size: int, _read=read) -> int:  # type: ignore[no-untyped-def]
            if offset == 0x60:
                counts["status"] += 1
            return _read(offset, size)
        transport.write = counting_write  # type: ignore[method-assign]
        transport.read = counting_read  # type: ignore[method-assign]
    return counts


def _run(machine, timeout: float) -> tuple[int, bytes, object]:  # type: ignore[no-untyped-def]
    """Run the vCPU until the exit port is written (or ``timeout``); the exit value, a copy of RAM and
    the last exit."""
    vcpu, board = machine.vcpu, machine.board
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        vcpu.request_stop()
    timer = threading.Timer(timeout, expire)
    timer.daemon = True
    timer.start()
    try:
        while True:
            exit_ = vcpu.run()
            if isinstance(exit_, Stopped) and board.exit_device.value is None and not expired.is_set():
                continue
            break
    finally:
        timer.cancel()
    value = board.exit_device.value if board.exit_device.value is not None else -1
    return value, board.memory.read(0, 4 << 20), exit_
