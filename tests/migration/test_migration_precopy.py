"""Live pre-copy: a guest that keeps writing memory is migrated while it runs; only the last round is
sent with the VM stopped (far fewer bytes than a stop-and-copy of its RAM), the statistics say so, and
the destination's RAM equals the source's final RAM page for page."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

import pyemu
from pyemu.accel.base import AcceleratorUnavailable
from pyemu.hw.core.dma import DmaMemory
from pyemu.migration.precopy import LogTracker, ShadowTracker, make_tracker
from pyemu.migration.stream import StreamWriter
from pyemu.migration.vmstate import LoadStats
from pyemu.system.memory import GuestMemory
from pyemu.system.runstate import RunState

from migration_programs import (BUFFER_ADDR, BUFFER_SIZE, FILL, PAGING_PD, PAGING_WINDOW, PAGING_WINDOW_PAGES,
                                WINDOW_PAGES, write_dirty_kernel, write_paging_kernel)
from test_migration_guest import BASE, TIMEOUT, stop_vm, wait_migration

MIB = 1 << 20


def machine_of(vm: pyemu.VM) -> Any:
    return vm._instance.machine


def wait_filled(vm: pyemu.VM) -> None:
    memory = machine_of(vm).memory
    deadline = time.monotonic() + TIMEOUT
    while memory.read_u32(BUFFER_ADDR + BUFFER_SIZE - 4) != FILL or memory.read_u32(BUFFER_ADDR) < 1000:
        assert time.monotonic() < deadline, "the guest did not fill its buffer"
        time.sleep(0.02)


def kvm_usable() -> bool:
    from pyemu.accel.kvm.accel import KvmAccelerator

    try:
        KvmAccelerator().close()
    except AcceleratorUnavailable:
        return False
    return True


@pytest.mark.parametrize("transport,accel", [
    ("unix", "tcg"), ("tcp", "tcg"),
    pytest.param("tcp", "kvm", marks=[pytest.mark.kvm, pytest.mark.skipif(not kvm_usable(),
                                                                          reason="KVM is not usable here")])])
def test_precopy_downtime_sends_a_fraction_and_every_page_matches(short_dir: Path, transport: str,
                                                                   accel: str) -> None:
    """Under TCG changed pages are found by comparison; under KVM by the dirty log (KVM_GET_DIRTY_LOG)."""
    kernel = write_dirty_kernel(short_dir)
    base = tuple(accel if word == "tcg" else word for word in BASE)
    uri = f"unix:{short_dir}/pre.sock" if transport == "unix" else "tcp:127.0.0.1:0"
    dest = pyemu.VM("-kernel", str(kernel), *base, "-incoming", uri, "-S")
    dest.start()
    source = pyemu.VM("-kernel", str(kernel), *base)
    source.start()
    try:
        if transport == "tcp":
            uri = f"tcp:127.0.0.1:{dest._instance.control.migration.incoming_address[1]}"
        wait_filled(source)
        source.events.drain()
        source.execute("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
        source.execute("migrate", {"uri": uri})
        info = wait_migration(source)
        assert info["status"] == "completed", info
        ram = info["ram"]
        assert ram["dirty-sync-count"] >= 2  # at least one round after the bulk, plus the final one
        assert ram["precopy-bytes"] > BUFFER_SIZE  # the 20 MiB pattern went while the guest ran...
        assert ram["downtime-bytes"] < BUFFER_SIZE // 4  # ...the stop-and-copy carried a fraction of it
        assert ram["transferred"] == ram["precopy-bytes"] + ram["downtime-bytes"]
        assert ram["remaining"] == 0 and "downtime" in info
        events = [(e.name, e.data) for e in source.events.drain()]
        assert events == [("MIGRATION", {"status": "setup"}), ("MIGRATION", {"status": "active"}),
                          ("STOP", {}), ("MIGRATION", {"status": "completed"})]
        assert wait_migration(dest) == {"status": "completed"}
        assert dest.state is RunState.PAUSED
        src_mem, dst_mem = machine_of(source).memory, machine_of(dest).memory
        for region in src_mem.regions:
            for start in range(0, region.size, MIB):
                gpa = region.gpa + start
                assert src_mem.read(gpa, MIB) == dst_mem.read(gpa, MIB), f"RAM differs in the MiB at {gpa:#x}"
        window = [src_mem.read_u32(BUFFER_ADDR + page * 4096) for page in range(WINDOW_PAGES)]
        assert max(window) - min(window) < 2 * WINDOW_PAGES and min(window) > 0  # the guest's own invariant
        src_regs = machine_of(source).vcpus[0].save_state().regs
        assert machine_of(dest).vcpus[0].save_state().regs == src_regs
        if accel == "kvm":
            from pyemu.accel.kvm.accel import KvmAccelerator

            assert isinstance(machine_of(source).accel, KvmAccelerator)
            assert machine_of(source).accel._dirty_dma is None  # the log was switched off again
        dest.resume()
        deadline = time.monotonic() + TIMEOUT
        while dst_mem.read_u32(BUFFER_ADDR) <= window[0] + 10 * WINDOW_PAGES:
            assert time.monotonic() < deadline, "the destination does not go on writing"
            time.sleep(0.02)
    finally:
        stop_vm(source)
        stop_vm(dest)


def test_a_paused_vm_is_stop_and_copy(short_dir: Path) -> None:
    kernel = write_dirty_kernel(short_dir)
    vm = pyemu.VM("-kernel", str(kernel), *BASE)
    vm.start()
    try:
        wait_filled(vm)
        vm.pause()
        vm.execute("migrate", {"uri": f"file:{short_dir / 'vm.state'}"})
        ram = wait_migration(vm)["ram"]
        assert ram["dirty-sync-count"] == 1 and ram["precopy-bytes"] == 0
        assert ram["downtime-bytes"] == ram["transferred"] > BUFFER_SIZE
    finally:
        stop_vm(vm)


def test_shadow_tracker_sends_changes_only_including_pages_that_became_zero() -> None:
    memory = GuestMemory([(0, 4 * MIB)])
    try:
        class Sink:
            def __init__(self) -> None:
                self.size = 0

            def write(self, data: bytes, /) -> int:
                self.size += len(data)
                return len(data)

        tracker = ShadowTracker(memory)
        writer = StreamWriter(Sink())
        stats = LoadStats()
        memory.write(0x1000, b"\x01" * 4096)
        memory.write(0x3000, b"\x02")
        assert tracker.sync(writer, stats, first=True) == 2 * 4096
        assert stats.zero_pages == 1024 - 2
        assert tracker.sync(writer, stats) == 0  # nothing changed
        memory.write(0x1000, bytes(4096))  # became zero: the destination must see zeros too
        memory.write(0x200000, b"\x03")
        assert tracker.sync(writer, stats) == 2 * 4096
        assert tracker.sync(writer, stats) == 0
    finally:
        memory.close()


def test_a_downtime_limit_too_small_keeps_iterating_until_raised(short_dir: Path) -> None:
    """As QEMU without auto-converge: the guest rewrites 1 MiB all the time, which cannot be sent in
    1 ms, so rounds go on with the guest running; raising downtime-limit lets the next round converge."""
    kernel = write_dirty_kernel(short_dir)
    vm = pyemu.VM("-kernel", str(kernel), *BASE)
    vm.start()
    try:
        wait_filled(vm)
        # 8 MiB/s: every round lasts long enough (>= 1/8 s for the 1 MiB window) for the guest to dirty its
        # window again even on a loaded host; a round that found nothing would rightly converge.
        vm.execute("migrate-set-parameters", {"downtime-limit": 0, "max-bandwidth": 8 << 20})
        vm.execute("migrate", {"uri": f"file:{short_dir / 'vm.state'}"})
        deadline = time.monotonic() + TIMEOUT
        while True:
            info = vm.execute("query-migrate")
            assert info["status"] in ("setup", "active"), info
            if info["ram"]["dirty-sync-count"] >= 4:
                break
            assert time.monotonic() < deadline, info
            time.sleep(0.02)
        assert vm.state is RunState.RUNNING  # still live
        assert info["expected-downtime"] >= 0 and info["ram"]["remaining"] > 0
        before = machine_of(vm).memory.read_u32(BUFFER_ADDR)
        while machine_of(vm).memory.read_u32(BUFFER_ADDR) == before:  # the guest keeps running meanwhile
            assert time.monotonic() < deadline
            time.sleep(0.01)
        vm.execute("migrate-set-parameters", {"downtime-limit": 2000 * 1000, "max-bandwidth": 0})
        info = wait_migration(vm)
        assert info["status"] == "completed" and info["ram"]["dirty-sync-count"] >= 5
        assert vm.state is RunState.POSTMIGRATE
    finally:
        stop_vm(vm)


def ram_pages(memory: GuestMemory) -> dict[int, bytes]:
    """Every page of RAM by guest-physical address (a snapshot to compare the dirty log against)."""
    pages: dict[int, bytes] = {}
    for region in memory.regions:
        data = memory.read(region.gpa, region.size)
        for offset in range(0, region.size, 4096):
            pages[region.gpa + offset] = data[offset:offset + 4096]
    return pages


def wait_guest_wrote(memory: GuestMemory, gpa: int, rounds: int) -> None:
    """Until the guest's count at ``gpa`` rose by ``rounds`` (it runs while the log records)."""
    start = memory.read_u32(gpa)
    deadline = time.monotonic() + TIMEOUT
    while memory.read_u32(gpa) < start + rounds:
        assert time.monotonic() < deadline, "the guest stopped writing"
        time.sleep(0.005)


@pytest.mark.parametrize("program", ["flat", "paging"])
def test_tcg_dirty_log_reports_every_page_written_between_syncs(short_dir: Path, program: str) -> None:
    """The TLB-fill hook's log (issue 13: TCG write tracking through pyemu's own hook): between two
    syncs, every page whose bytes changed -- guest stores with paging off, stores through page tables
    whose accessed/dirty bits the CPU sets, device DMA -- is reported, in round after round (each sync
    makes the next store to an already reported page come back to the hook), and little else is."""
    kernel = write_dirty_kernel(short_dir) if program == "flat" else write_paging_kernel(short_dir)
    counted = BUFFER_ADDR if program == "flat" else PAGING_WINDOW
    vm = pyemu.VM("-kernel", str(kernel), *BASE)
    vm.start()
    try:
        machine = machine_of(vm)
        memory = machine.memory
        if program == "flat":
            wait_filled(vm)
        else:
            wait_guest_wrote(memory, PAGING_WINDOW + 4096 * (PAGING_WINDOW_PAGES - 1), 1)
        accel = machine.accel
        assert accel.dirty_logging_available
        assert isinstance(make_tracker(machine), LogTracker)  # precopy uses the log, not the comparison
        dma = DmaMemory(memory, accel.invalidate_code)  # the path device models write guest RAM through
        accel.start_dirty_log()
        try:
            for round_ in range(4):
                vm.pause()
                if program == "paging":  # the CPU sets them again at its next walk (the sync flushed TLBs)
                    pte = PAGING_PD + 0x1000 + (PAGING_WINDOW >> 12) * 4
                    for i in range(PAGING_WINDOW_PAGES):
                        memory.write_u32(pte + 4 * i, memory.read_u32(pte + 4 * i) & ~0x60)
                accel.fetch_dirty_pages()
                before = ram_pages(memory)
                vm.resume()
                wait_guest_wrote(memory, counted, 3 * WINDOW_PAGES)
                dma_page = 0x1800000 + round_ * 0x3000
                dma.write(dma_page + 100, bytes([round_ + 1]) * 5000)  # two pages
                vm.pause()
                reported = accel.fetch_dirty_pages()
                after = ram_pages(memory)
                changed = {gpa for gpa, data in after.items() if before[gpa] != data}
                assert changed - reported == set(), f"round {round_}: writes not reported"
                assert {dma_page, dma_page + 4096} <= reported
                window = PAGING_WINDOW if program == "paging" else BUFFER_ADDR
                pages = PAGING_WINDOW_PAGES if program == "paging" else WINDOW_PAGES
                assert {window + 4096 * i for i in range(pages)} <= changed
                assert len(reported - changed) <= 8, sorted(reported - changed)
                if program == "paging":  # accessed/dirty bits set by the CPU's page walk
                    assert (PAGING_PD + 0x1000 + (PAGING_WINDOW >> 12) * 4) & ~0xFFF in changed
                vm.resume()
        finally:
            accel.stop_dirty_log()
        stats = accel.dirty_log_statistics
        assert stats["log_fallbacks"] == 0 and stats["dirty_marks"] > 0
        before_value = memory.read_u32(counted)
        wait_guest_wrote(memory, counted, 1)  # logging off: the guest runs on
        assert memory.read_u32(counted) > before_value
    finally:
        stop_vm(vm)


def test_without_the_tlb_fill_hook_precopy_falls_back_to_the_comparison(short_dir: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine's own TLB fill (PYEMU_TCG_ENGINE_TLB=1) has no dirty log: the shadow comparison moves it."""
    monkeypatch.setenv("PYEMU_TCG_ENGINE_TLB", "1")
    kernel = write_dirty_kernel(short_dir)
    vm = pyemu.VM("-kernel", str(kernel), *BASE)
    vm.start()
    try:
        wait_filled(vm)
        assert not machine_of(vm).accel.dirty_logging_available
        assert isinstance(make_tracker(machine_of(vm)), ShadowTracker)
        vm.execute("migrate", {"uri": f"file:{short_dir / 'vm.state'}"})
        info = wait_migration(vm)
        assert info["status"] == "completed" and info["ram"]["dirty-sync-count"] >= 2
    finally:
        stop_vm(vm)
