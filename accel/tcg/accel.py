"""The software CPU accelerator (``-accel tcg``): Unicorn engines that behave like x86-64 CPUs.

One Unicorn engine per vCPU, each mapping the same guest RAM zero-copy and every non-RAM address as a
device window. The engines of a VM take turns (:mod:`pyemu.accel.tcg.scheduler`: one runs at a time,
which keeps guest atomics atomic) and share the record of which RAM pages hold whose translated code
(:class:`pyemu.accel.tcg.tlb_fill.CodeMap`), so a store by one vCPU invalidates another's stale code. Interrupts come from pyemu's userspace LAPIC (``needs_userspace_lapic``), so there is no
MSI sink here: the board routes MSIs to the LAPIC models, which call ``vcpu.kick()``.

The CPU-state blob layout is calibrated once per process (:mod:`pyemu.accel.tcg.calibration`) and the C
block gate is built once per source version (:mod:`pyemu.accel.tcg.block_gate`), both when the first
vCPU is created.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from pyemu.accel.dispatch import ExitDispatcher
from pyemu.accel.tcg.calibration import calibrate
from pyemu.accel.tcg.dirty_log import TcgDirtyLog
from pyemu.accel.tcg.block_gate import load_gate_module
from pyemu.accel.tcg.errors import TcgError
from pyemu.accel.tcg.guest_tsc import GuestTsc
from pyemu.accel.tcg.halt_poll import default_max_poll_ns
from pyemu.accel.tcg.mmio_notify import MmioNotifiers
from pyemu.accel.tcg.port_fast_paths import PortFastPaths, PostedWriteWatch
from pyemu.accel.tcg.scheduler import RoundRobin
from pyemu.accel.tcg.tlb_fill import CodeMap, tlb_hook_enabled
from pyemu.accel.tcg.tsc import host_tsc_hz
from pyemu.accel.tcg.vcpu import TcgVcpu
from pyemu.accel.tcg.vcpu_placement import SharedCpu
from pyemu.hw.intc.api import InterruptController, MsiSink
from pyemu.system.event_notifier import EventNotifier
from pyemu.system.memory import GuestMemory
from pyemu.target.x86.cpu_models import TCG_FEATURES
from pyemu.target.x86.cpuid import CpuidTable

if TYPE_CHECKING:
    from pyemu.hw.core.dma import WriteScreen
    from pyemu.system.shared_word import SharedWord


class TcgAccelerator:
    """Implements :class:`pyemu.accel.base.Accelerator` with Unicorn 2.1.4."""

    name = "tcg"
    needs_userspace_lapic = True

    def __init__(self) -> None:
        from pyemu.accel import tcg

        if tcg.ENGINE_LIBRARY_ERROR is not None:  # PYEMU_UNICORN asked for what cannot be had
            raise tcg.ENGINE_LIBRARY_ERROR
        self._memory: GuestMemory | None = None
        self._dispatcher: ExitDispatcher | None = None
        self._cpuid: CpuidTable | None = None
        self.vcpus: list[TcgVcpu] = []
        self.scheduler = RoundRobin()
        self.placement = SharedCpu()
        """The host CPU the vCPU threads share when they cannot each have one (see vcpu_placement.py)."""
        self._code_map: CodeMap | None = None
        self._dirty_log: TcgDirtyLog | None = None
        self.tsc = GuestTsc()
        """The guest TSC of every vCPU (one offset: they cannot differ under Unicorn)."""
        self._port_fast: PortFastPaths | None = None
        self._posted_watch: PostedWriteWatch | None = None
        self._mmio_notifiers: MmioNotifiers | None = None

    @property
    def tsc_hz(self) -> int:
        """The TSC rate the guest sees (the host's: RDTSC is not virtualised by Unicorn)."""
        return host_tsc_hz()

    def cpu_features(self) -> frozenset[str]:
        """What the software CPU executes (each backed by a guest test, see TCG_FEATURES)."""
        return TCG_FEATURES

    def attach(self, memory: GuestMemory, dispatcher: ExitDispatcher, cpuid: CpuidTable) -> None:
        self._memory = memory
        self._dispatcher = dispatcher
        self._cpuid = cpuid

    def create_vcpu(self, index: int, interrupts: InterruptController | None = None) -> TcgVcpu:
        if self._memory is None or self._dispatcher is None or self._cpuid is None:
            raise TcgError("create_vcpu before attach: the accelerator has no guest memory yet")
        if self.vcpus and not tlb_hook_enabled():
            raise TcgError("several software vCPUs need the TLB-fill hook to keep their translated code "
                           "coherent; unset PYEMU_TCG_ENGINE_TLB")
        if self._code_map is None and tlb_hook_enabled():
            self._code_map = CodeMap(self._memory, load_gate_module())
            self._dirty_log = TcgDirtyLog(self._code_map, self.scheduler)
        vcpu = TcgVcpu(index, self._memory, self._dispatcher, self._cpuid, calibrate(), interrupts,
                       scheduler=self.scheduler, code_map=self._code_map, tsc=self.tsc,
                       placement=self.placement, mmio_notifiers=self._notifier_table())
        if self._port_fast is None:
            self._port_fast = PortFastPaths(load_gate_module())
            self._dispatcher.pio.bind_fast_paths(self._port_fast.publish)
            self._posted_watch = PostedWriteWatch(lambda: self.vcpus)
        vcpu.use_port_fast_paths(self._port_fast)
        self.vcpus.append(vcpu)
        max_poll_ns = default_max_poll_ns(len(self.vcpus))
        for each in self.vcpus:
            each.halt_polling.max_ns = max_poll_ns
        # vCPUs that cannot spin on CPUs of their own hand the turn over on one CPU instead; a VM's only
        # vCPU stays on one CPU so that its caches stay warm (vcpu_placement.py).
        self.placement.enabled = len(self.vcpus) == 1 or max_poll_ns == 0
        return vcpu

    # -- event notifiers (virtio kicks without Python on the vCPU thread, see mmio_notify.py) -----------
    def _notifier_table(self) -> MmioNotifiers:
        if self._mmio_notifiers is None:
            self._mmio_notifiers = MmioNotifiers(load_gate_module())
        return self._mmio_notifiers

    def bind_ioeventfd(self, notifier: EventNotifier, addr: int, length: int, datamatch: int) -> None:
        """A guest write of ``datamatch`` (``length`` bytes) at MMIO ``addr`` signals ``notifier`` from the
        engine's C window callback: the vCPU does not enter Python for it."""
        self._notifier_table().bind(notifier, addr, length, datamatch)

    def bind_interrupt_status(self, addr: int, word: SharedWord) -> bool:
        """Guest reads of the virtio-mmio InterruptStatus register at MMIO ``addr`` and writes of InterruptACK
        after it are served from ``word`` in the engine's C window callbacks; False if it cannot be."""
        return self._notifier_table().bind_status(addr, word)

    @property
    def ioeventfd_hits(self) -> int:
        """Guest writes that signalled a bound notifier without Python (tests, benchmarks)."""
        return self._mmio_notifiers.hits if self._mmio_notifiers is not None else 0

    def invalidate_code(self, gpa: int, size: int) -> None:
        """Guest RAM ``[gpa, gpa+size)`` was written outside the engines (device DMA): every vCPU drops
        translated code from it before running on. Thread-safe.

        Only pages that some engine fetched code from need it (the code map records every fetch fill
        before the translation is made, so a page not marked there has no translation to go stale); a
        disk read into the page cache or a network buffer then costs a byte test per page instead of
        a service stop of every vCPU."""
        self.invalidate_code_ranges(((gpa, size),))

    def dma_write_screen(self) -> WriteScreen | None:
        """What devices' C code may skip reporting (:class:`~pyemu.hw.core.dma.WriteScreen`): written ranges
        before the first that touches code, unless the dirty log runs. None before the first vCPU or
        without the code map (``PYEMU_TCG_ENGINE_TLB=1``): then every range is reported."""
        return self._code_map.write_screen if self._code_map is not None else None

    def invalidate_code_ranges(self, ranges: Sequence[tuple[int, int]]) -> None:
        """:meth:`invalidate_code` for each ``(gpa, size)`` of one device request (up to a range per guest
        page), with one pass over the code map for all of them."""
        code_map = self._code_map
        if code_map is None:
            stale = [(gpa, size) for gpa, size in ranges if size > 0]
        else:
            dirty = code_map.dirty
            if dirty.logging:  # live migration's dirty log
                for gpa, size in ranges:
                    dirty.mark(gpa, size)
            stale = code_map.ranges_with_code(ranges)
        for gpa, size in stale:
            for vcpu in self.vcpus:
                vcpu.invalidate_code(gpa, size)

    # -- dirty logging (pyemu.accel.base.DirtyLogging), see pyemu.accel.tcg.dirty_log -------------------
    @property
    def dirty_logging_available(self) -> bool:
        """The log needs the TLB-fill hook (not with ``PYEMU_TCG_ENGINE_TLB=1``) and a vCPU created."""
        return self._dirty_log is not None

    def _log(self) -> TcgDirtyLog:
        if self._dirty_log is None:
            raise TcgError("dirty-page logging needs the TLB-fill hook and at least one vCPU")
        return self._dirty_log

    def start_dirty_log(self) -> None:
        self._log().start()

    def fetch_dirty_pages(self) -> set[int]:
        return self._log().fetch()

    def stop_dirty_log(self) -> None:
        self._log().stop()

    @property
    def dirty_log_statistics(self) -> dict[str, int]:
        """Pages marked and write fills left to Unicorn's MMU while logging (tests, benchmarks)."""
        return self._code_map.dirty.statistics if self._code_map is not None else {}

    def msi_sink(self) -> MsiSink | None:
        return None

    @property
    def port_fast_path_statistics(self) -> dict[str, int]:
        """Port reads answered and writes posted by the engines without a call into Python (see
        :class:`pyemu.system.bus.RegisterFastPath`; tests, benchmarks)."""
        return self._port_fast.statistics if self._port_fast is not None else {}

    def close(self) -> None:
        if self._posted_watch is not None:
            self._posted_watch.close()
        for vcpu in self.vcpus:
            vcpu.close()
        self.vcpus.clear()
        self.placement.close()
        if self._port_fast is not None and self._dispatcher is not None:
            self._dispatcher.pio.bind_fast_paths(None)
        if self._mmio_notifiers is not None:
            self._mmio_notifiers.close()
