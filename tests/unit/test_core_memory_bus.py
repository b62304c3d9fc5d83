"""Guest memory bounds, bus dispatch by range, IRQ lines."""

import os

import pytest

from pyemu.errors import BusError, ConfigError, GuestMemoryError
from pyemu.hw.core.irq import IrqLine, fanout
from pyemu.system.bus import Bus, pio_bus
from pyemu.system.memory import GuestMemory


def test_memory_regions_are_one_memfd_and_zero_copy():
    mem = GuestMemory([(0, 0x10000), (0x100000000, 0x2000)], backend="memfd")
    assert mem.total_size == 0x12000
    mem.write_u64(0x100000ff8, 0x1122334455667788)
    assert mem.read(0x100000ff8, 8) == bytes.fromhex("8877665544332211")
    view = mem.view(0x10, 4)
    view[:] = b"abcd"
    assert mem.read_u32(0x10) == int.from_bytes(b"abcd", "little")
    # the same bytes are visible through the memfd: accelerators map the same pages
    import os
    assert os.pread(mem.fd, 4, 0x10) == b"abcd"
    assert os.pread(mem.fd, 8, 0x10000 + 0xFF8) == bytes.fromhex("8877665544332211")


@pytest.mark.parametrize("gpa,size", [(0x10000, 1), (0xFFFF, 2), (0x100001FFF, 2), (-1, 1), (0x20000, 4)])
def test_memory_access_outside_ram_is_a_typed_error(gpa, size):
    mem = GuestMemory([(0, 0x10000), (0x100000000, 0x2000)])
    with pytest.raises(GuestMemoryError) as info:
        mem.read(gpa, size)
    assert info.value.gpa == gpa and info.value.size == size
    with pytest.raises(GuestMemoryError):
        mem.write(gpa, bytes(size))


def test_memory_layout_errors():
    with pytest.raises(ConfigError):
        GuestMemory([(0, 0x1000), (0x800, 0x1000)])
    with pytest.raises(ConfigError):
        GuestMemory([(0, 0x1001)])
    with pytest.raises(ConfigError):
        GuestMemory([])


class Recorder:
    def __init__(self, value=0x5A):
        self.value = value
        self.log = []

    def read(self, offset, size):
        self.log.append(("r", offset, size))
        return self.value

    def write(self, offset, size, value):
        self.log.append(("w", offset, size, value))


def test_bus_passes_offsets_and_unassigned_is_all_ones():
    bus = pio_bus()
    uart, rtc = Recorder(0x11), Recorder(0x22)
    bus.register(0x3F8, 8, uart, "uart")
    bus.register(0x70, 2, rtc, "rtc")
    assert bus.read(0x3FD, 1) == 0x11
    bus.write(0x71, 1, 0x80)
    assert uart.log == [("r", 5, 1)]
    assert rtc.log == [("w", 1, 1, 0x80)]
    assert bus.read(0x3F7, 1) == 0xFF
    assert bus.read(0x400, 2) == 0xFFFF
    assert bus.read(0x3F0, 4) == 0xFFFFFFFF
    bus.write(0x500, 1, 1)  # ignored
    assert uart.log == [("r", 5, 1)] and rtc.log == [("w", 1, 1, 0x80)]


@pytest.mark.parametrize("base,length", [(0x3F8, 1), (0x3F0, 0x10), (0x3FF, 4), (0x300, 0x200)])
def test_bus_rejects_overlaps(base, length):
    bus = pio_bus()
    bus.register(0x3F8, 8, Recorder(), "uart")
    with pytest.raises(BusError, match="overlaps uart"):
        bus.register(base, length, Recorder(), "other")


def test_bus_rejects_bad_ranges_and_unregisters():
    bus = Bus("pio", 0x10000)
    dev = Recorder()
    with pytest.raises(BusError):
        bus.register(0xFFFF, 2, dev)
    with pytest.raises(BusError):
        bus.register(0x10, 0, dev)
    bus.register(0x10, 4, dev)
    bus.register(0x20, 4, dev)
    bus.unregister(dev)
    assert bus.find(0x10) is None and bus.read(0x21, 1) == 0xFF


def test_irq_line_and_fanout():
    seen_a, seen_b = [], []
    a, b = IrqLine(seen_a.append), IrqLine(seen_b.append)
    line = fanout(a, b)
    line.pulse()
    line.raise_irq()
    assert seen_a == [1, 0, 1] and seen_b == [1, 0, 1]
    assert a.level == 1
    unconnected = IrqLine()
    unconnected.raise_irq()
    assert unconnected.level == 1


@pytest.mark.parametrize("backend", ["ram", "memfd"])
def test_populated_spans_find_what_was_written_without_touching_holes(backend):
    memory = GuestMemory([(0, 4 << 20), (8 << 20, 4 << 20)], backend=backend)
    low, high = memory.regions
    assert list(memory.populated_spans(low)) == [] and list(memory.populated_spans(high)) == []
    memory.write(0x3000, b"a")
    memory.write(0x3FFF + 1, b"b")  # the next page: one run of two pages
    memory.write((8 << 20) + 0x208000, b"c")
    # What was written is inside the runs; anonymous memory may fault in a whole huge page around it.
    grain = 0x1000 if backend == "memfd" else 2 << 20
    assert list(memory.populated_spans(low)) == [(0x3000 // grain * grain, max(0x2000, grain))]
    assert list(memory.populated_spans(high)) == [((8 << 20) + 0x208000 // grain * grain, grain)]
    assert list(memory.populated_spans(low)) == [(0x3000 // grain * grain, max(0x2000, grain))]  # no side effect
    memory.clear()  # released pages are holes again
    assert list(memory.populated_spans(low)) == [] and list(memory.populated_spans(high)) == []
    assert memory.read(0x3000, 2) == b"\0\0"
    memory.close()


def test_anonymous_ram_starts_on_a_huge_page_and_asks_for_them():
    """The default backend: guest 2 MiB pages can be host huge pages (see pyemu.system.memory)."""
    import re
    from pathlib import Path

    from pyemu.system.memory import HUGE_PAGE
    memory = GuestMemory([(0, 8 << 20)])
    try:
        assert memory.backend == "ram" and memory.fd == -1
        base = memory.host_address(memory.regions[0])
        assert base % HUGE_PAGE == 0
        mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
        if "[never]" in mode:
            pytest.skip("transparent huge pages are off on this host")
        for vma in re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", Path("/proc/self/smaps").read_text()):
            low, high = (int(x, 16) for x in vma.split()[0].split("-"))
            if low <= base < high:
                assert "THPeligible:    1" in re.sub(r" +", lambda m: " " * min(4, len(m.group())), vma)
                break
        else:
            pytest.fail("guest RAM's mapping is not in /proc/self/smaps")
    finally:
        memory.close()


def test_unknown_ram_backend_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown guest RAM backend"):
        GuestMemory([(0, 0x10000)], backend="hugetlbfs")


@pytest.mark.parametrize("backend", ["ram", "memfd"])
def test_copy_from_file_puts_file_bytes_at_the_address_and_stops_at_the_files_end(tmp_path, backend):
    data = bytes(range(256)) * 64  # 16 KiB
    path = tmp_path / "image"
    path.write_bytes(data)
    memory = GuestMemory([(0, 1 << 20), (4 << 20, 1 << 20)], backend=backend)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert memory.copy_from_file((4 << 20) + 0x1001, fd, 3, 0x2000) == 0x2000
        assert memory.read((4 << 20) + 0x1001, 0x2000) == data[3:3 + 0x2000]
        assert memory.read((4 << 20) + 0x1000, 1) == b"\0" and memory.read((4 << 20) + 0x3001, 1) == b"\0"
        # Past the file's end: what there is, and the count says so.
        assert memory.copy_from_file(0x100, fd, len(data) - 10, 100) == 10
        assert memory.read(0x100, 11) == data[-10:] + b"\0"
        # Not wholly inside one RAM region: refused before anything is copied.
        with pytest.raises(GuestMemoryError):
            memory.copy_from_file((1 << 20) - 8, fd, 0, 16)
        assert memory.read((1 << 20) - 8, 8) == bytes(8)
        # A region mapped privately from a file: the copy lands where the guest reads it.
        backing = tmp_path / "ram"
        backing.write_bytes(bytes(1 << 20))
        backing_fd = os.open(backing, os.O_RDONLY)
        try:
            memory.map_file_private(memory.regions[0], backing_fd, 0)
            assert memory.copy_from_file(0x2000, fd, 0, 512) == 512
            assert memory.read(0x2000, 512) == data[:512]
            assert backing.read_bytes()[0x2000:0x2200] == bytes(512)  # the file itself never changes
        finally:
            os.close(backing_fd)
        # A reset maps the backend's own memory back: zeros, writable, and not the file.
        memory.clear()
        assert memory.read(0x2000, 512) == bytes(512)
        memory.write(0x2000, b"ok")
        assert memory.read(0x2000, 2) == b"ok" and backing.read_bytes()[0x2000:0x2002] == bytes(2)
        assert [gpa for gpa, _ in memory.populated_spans(memory.regions[0])] == [0x2000 if backend == "memfd" else 0]
    finally:
        os.close(fd)
        memory.close()


# -- fast paths -------------------------------------------------------------------------------------------


def test_fast_paths_reach_the_bound_sink_now_and_on_every_change() -> None:
    bus = pio_bus()
    lsr = bus.fast_path(0x3FD)
    assert bus.fast_path(0x3FD) is lsr and lsr.read_value is None and not lsr.posted_writes
    lsr.publish_read(0x60)                        # nothing bound yet: kept, sent when bound
    sent: list[tuple[int, int | None, bool]] = []
    bus.bind_fast_paths(lambda address, value, posted: sent.append((address, value, posted)))
    assert sent == [(0x3FD, 0x60, False)]
    lsr.publish_read(0x60)                        # no change, nothing sent
    lsr.publish_read(0x61)
    thr = bus.fast_path(0x3F8)                    # made after binding: bound too
    thr.post_writes(True)
    thr.post_writes(True)
    lsr.publish_read(None)
    assert sent == [(0x3FD, 0x60, False), (0x3FD, 0x61, False), (0x3F8, None, True), (0x3FD, None, False)]
    bus.bind_fast_paths(None)
    lsr.publish_read(0x60)
    assert sent[-1] == (0x3FD, None, False)


def test_fast_paths_refuse_what_a_byte_register_cannot_hold_and_go_with_their_device() -> None:
    bus = pio_bus()
    with pytest.raises(BusError):
        bus.fast_path(0x10000)
    path = bus.fast_path(0x3FD)
    with pytest.raises(ValueError):
        path.publish_read(0x100)
    device = _Echo()
    bus.register(0x3F8, 8, device, "uart")
    path.publish_read(0x60)
    path.post_writes(True)
    sent: list[tuple[int, int | None, bool]] = []
    bus.bind_fast_paths(lambda address, value, posted: sent.append((address, value, posted)))
    bus.unregister(device)
    assert sent[-1] == (0x3FD, None, False) and path.read_value is None and not path.posted_writes
    assert bus.fast_path(0x3FD) is not path       # a device placed there later starts afresh


class _Echo:
    def read(self, offset: int, size: int) -> int:
        return offset

    def write(self, offset: int, size: int, value: int) -> None:
        pass
