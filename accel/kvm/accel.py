"""``-accel kvm``: the KVM accelerator a board plugs in (implements :class:`pyemu.accel.base.Accelerator`).

What it sets up, in the order KVM requires: /dev/kvm checks (AcceleratorUnavailable if unusable), the VM
with the split irqchip (LAPICs in the kernel, pyemu's IOAPIC in userspace delivering through
:meth:`KvmAccelerator.msi_sink`), guest RAM as memory slots, then vCPUs with pyemu's CPUID filtered through
what KVM supports and the real TSC / LAPIC-bus frequencies. The VM is created in the constructor so that an
unusable KVM is reported there, where ``-accel kvm:tcg`` can still fall back to the software CPU.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from pyemu.accel.base import AcceleratorUnavailable
from pyemu.accel.dispatch import ExitDispatcher
from pyemu.accel.kvm import abi
from pyemu.accel.kvm.cpuid import build_vcpu_cpuid, dropped_features, supported_features
from pyemu.accel.kvm.errors import KvmError
from pyemu.accel.kvm.guest_tsc import KvmGuestTsc
from pyemu.accel.kvm.kick import install_kick_handler
from pyemu.accel.kvm.system import KvmSystem
from pyemu.accel.kvm.vcpu import EoiHandler, KvmVcpu
from pyemu.accel.kvm.vm import KvmVm
from pyemu.errors import ConfigError
from pyemu.hw.intc.api import InterruptController
from pyemu.system import log
from pyemu.system.event_notifier import EventNotifier
from pyemu.system.memory import GuestMemory
from pyemu.target.x86.cpuid import CpuidTable

DEFAULT_HALT_PROBE_S = 0.05


class KvmMsiSink:
    """Where the userspace IOAPIC (and later MSI-capable devices) send messages: KVM_SIGNAL_MSI into the
    in-kernel LAPICs. Also mirrors the IOAPIC redirection table into KVM's GSI routes
    (:meth:`set_ioapic_route`) so the kernel reports EOIs of level-triggered vectors back to userspace."""

    def __init__(self, vm: KvmVm) -> None:
        self._vm = vm
        self._lock = threading.Lock()
        self.delivered = 0
        self.blocked = 0

    def deliver_msi(self, address: int, data: int) -> None:
        with self._lock:
            if self._vm.signal_msi(address, data):
                self.delivered += 1
            else:
                self.blocked += 1
                if log.enabled("guest_errors"):
                    log.log("guest_errors", f"kvm: MSI {address:#x}/{data:#x} not accepted (APIC disabled?)")

    def set_ioapic_route(self, pin: int, message: tuple[int, int] | None) -> None:
        """Pin ``pin`` now sends MSI ``(address, data)`` (None: masked). Commits at once."""
        with self._lock:
            self._vm.set_route(pin, message)
            self._vm.commit_routes()


class KvmAccelerator:
    """``KvmAccelerator(device=None, kvmclock=True, tsc_khz=None, halt_probe_s=0.05)``.

    ``device`` defaults to ``$PYEMU_KVM_DEVICE`` if set, else /dev/kvm
    (:func:`~pyemu.accel.kvm.system.default_device`);
    ``kvmclock`` adds KVM's paravirtual clock CPUID leaves (behind pyemu's hypervisor leaf);
    ``tsc_khz`` asks KVM for that guest TSC rate (KVM_SET_TSC_KHZ) instead of the host's;
    ``halt_probe_s`` bounds how long a HLT with IF=0 takes to come back as ``Halt``."""

    name = "kvm"
    needs_userspace_lapic = False

    def __init__(
        self,
        *,
        device: str | None = None,
        kvmclock: bool = True,
        tsc_khz: int | None = None,
        halt_probe_s: float = DEFAULT_HALT_PROBE_S,
    ) -> None:
        if halt_probe_s <= 0:
            raise ConfigError("kvm: halt probe interval must be positive")
        self.system = KvmSystem(device)
        try:
            install_kick_handler()
            self.vm = KvmVm(self.system)
        except KvmError as exc:
            self.system.close()
            raise AcceleratorUnavailable(f"KVM is not usable: {exc}; use -accel tcg instead") from exc
        except AcceleratorUnavailable:
            self.system.close()
            raise
        self.kvmclock = kvmclock
        self.tsc_khz = tsc_khz
        self._halt_probe_s = halt_probe_s
        self._memory: GuestMemory | None = None
        self._dispatcher: ExitDispatcher | None = None
        self._cpuid: CpuidTable | None = None
        self._vcpus: list[KvmVcpu] = []
        self._msi_sink = KvmMsiSink(self.vm)
        self._eoi_handler: EoiHandler | None = None
        self._probe_stop = threading.Event()
        self._probe_thread: threading.Thread | None = None
        self._closed = False
        self._ioeventfds: list[tuple[int, int, int, int]] = []
        self._irqfds: list[tuple[EventNotifier, int]] = []
        self.tsc = KvmGuestTsc(lambda: self.vcpus, self.vm.fd)
        """The guest TSC and kvmclock across pause/resume/reset (see :mod:`pyemu.accel.kvm.guest_tsc`)."""
        self._dirty_lock = threading.Lock()
        self._dirty_dma: set[int] | None = None
        """While logging: the pages devices wrote (KVM logs only the vCPUs' stores)."""

    # -- Accelerator protocol ---------------------------------------------------------------------------
    def cpu_features(self) -> frozenset[str]:
        """What KVM can present on this host (KVM_GET_SUPPORTED_CPUID, see :func:`supported_features`)."""
        return supported_features(self.system.supported_cpuid(), tsc_deadline=self._tsc_deadline_timer)

    @property
    def _tsc_deadline_timer(self) -> bool:
        """KVM_CAP_TSC_DEADLINE_TIMER: the in-kernel LAPIC offers the TSC-deadline mode."""
        return bool(self.system.check_extension(abi.KVM_CAP_TSC_DEADLINE_TIMER))

    def attach(self, memory: GuestMemory, dispatcher: ExitDispatcher, cpuid: CpuidTable) -> None:
        if self._memory is not None:
            raise ConfigError("kvm: accelerator already attached to a machine")
        for slot, region in enumerate(memory.regions):
            self.vm.set_memory_region(slot, region.gpa, region.size, memory.host_address(region))
        self._memory = memory
        self._dispatcher = dispatcher
        self._cpuid = cpuid

    def create_vcpu(self, index: int, interrupts: InterruptController | None = None) -> KvmVcpu:
        if self._dispatcher is None or self._cpuid is None:
            raise ConfigError("kvm: attach() the machine before creating vCPUs")
        fd = self.vm.create_vcpu_fd(index)
        try:
            if self.tsc_khz is not None:
                fd.ioctl(abi.KVM_SET_TSC_KHZ, self.tsc_khz)
            tsc_khz = fd.ioctl(abi.KVM_GET_TSC_KHZ)
        except KvmError:
            fd.close()
            raise
        table = self._cpuid.with_apic_id(index)
        entries = build_vcpu_cpuid(
            table,
            self.system.supported_cpuid(),
            tsc_khz=tsc_khz,
            apic_bus_hz=self.vm.apic_bus_hz,
            tsc_deadline=self._tsc_deadline_timer,
            kvmclock=self.kvmclock,
        )
        if index == 0:
            missing = dropped_features(table, entries)
            if missing:
                log.log("unimp", f"kvm: host KVM lacks CPU features {', '.join(missing)}; hidden from the guest")
        try:
            vcpu = KvmVcpu(
                fd,
                index,
                self.system.vcpu_mmap_size,
                self._dispatcher,
                cpuid=entries,
                msr_indices=self.system.msr_indices(),
                interrupts=interrupts,
                eoi_handler=lambda: self._eoi_handler,
                xsave=bool(self.system.check_extension(abi.KVM_CAP_XSAVE)),
                xcrs=bool(self.system.check_extension(abi.KVM_CAP_XCRS)),
            )
        except KvmError:
            fd.close()
            raise
        self._vcpus.append(vcpu)
        self._start_halt_probe()
        return vcpu

    def msi_sink(self) -> KvmMsiSink:
        return self._msi_sink

    # -- event notifiers (virtio: kicks and interrupts without Python on the vCPU thread) ---------------
    def bind_ioeventfd(self, notifier: EventNotifier, addr: int, length: int, datamatch: int) -> None:
        """A guest write of ``datamatch`` (``length`` bytes) at MMIO ``addr`` signals ``notifier`` inside
        the kernel: the vCPU does not exit to pyemu at all."""
        self.vm.set_ioeventfd(notifier.fileno(), addr, length, pio=False, datamatch=datamatch)
        self._ioeventfds.append((notifier.fileno(), addr, length, datamatch))

    def irq_notifier(self, gsi: int) -> EventNotifier:
        """An eventfd whose every write injects an edge on ``gsi`` through the route the guest programmed
        into the (userspace, mirrored) IOAPIC: KVM_IRQFD."""
        notifier = EventNotifier(f"irqfd-gsi{gsi}")
        try:
            self.vm.set_irqfd(notifier.fileno(), gsi)
        except KvmError:
            notifier.close()
            raise
        self._irqfds.append((notifier, gsi))
        return notifier

    def close(self) -> None:
        """Stop every vCPU (each run() returns Stopped), release vCPUs, then the VM and /dev/kvm."""
        if self._closed:
            return
        self._closed = True
        self._probe_stop.set()
        for vcpu in self._vcpus:
            vcpu.request_stop()
        for vcpu in self._vcpus:
            vcpu.close()
        if self._probe_thread is not None:
            self._probe_thread.join(timeout=1.0)
        self.vm.close()  # also drops the ioeventfd/irqfd bindings
        for notifier, _gsi in self._irqfds:
            notifier.close()
        self.system.close()

    # -- dirty logging (pyemu.accel.base.DirtyLogging) ----------------------------------------------
    def start_dirty_log(self) -> None:
        """Every memory slot gets KVM_MEM_LOG_DIRTY_PAGES (KVM write-protects the guest's RAM and records
        the first store to each page) and device writes are recorded from now on."""
        with self._dirty_lock:
            self._dirty_dma = set()
        for slot, (gpa, size, host) in self.vm.slots.items():
            self.vm.set_memory_region(slot, gpa, size, host, log_dirty=True)

    def fetch_dirty_pages(self) -> set[int]:
        pages: set[int] = set()
        for slot, (gpa, size, _host) in self.vm.slots.items():
            bitmap = self.vm.get_dirty_log(slot, size)
            for word_index in range(0, len(bitmap), 8):
                word = int.from_bytes(bitmap[word_index:word_index + 8], "little")
                while word:
                    low = word & -word
                    bit = low.bit_length() - 1
                    pages.add(gpa + ((word_index * 8 + bit) << 12))
                    word ^= low
        with self._dirty_lock:
            if self._dirty_dma is not None:
                pages |= self._dirty_dma
                self._dirty_dma = set()
        return pages

    def stop_dirty_log(self) -> None:
        with self._dirty_lock:
            self._dirty_dma = None
        for slot, (gpa, size, host) in self.vm.slots.items():
            self.vm.set_memory_region(slot, gpa, size, host)

    def invalidate_code(self, gpa: int, size: int) -> None:
        """A device wrote ``[gpa, gpa+size)`` (DmaMemory.wrote). No translated code to drop under KVM;
        while dirty logging, the pages are recorded (KVM's log does not see userspace writes)."""
        if self._dirty_dma is None or size <= 0:
            return
        with self._dirty_lock:
            if self._dirty_dma is not None:
                self._dirty_dma.update(page << 12 for page in range(gpa >> 12, ((gpa + size - 1) >> 12) + 1))

    def invalidate_code_ranges(self, ranges: Sequence[tuple[int, int]]) -> None:
        """:meth:`invalidate_code` for each range of one device request."""
        if self._dirty_dma is None:
            return
        for gpa, size in ranges:
            self.invalidate_code(gpa, size)

    # -- KVM-specific extras --------------------------------------------------------------------------
    @property
    def vcpus(self) -> tuple[KvmVcpu, ...]:
        return tuple(self._vcpus)

    def set_eoi_handler(self, handler: EoiHandler | None) -> None:
        """``handler(vector)`` runs (under the machine lock) when the guest EOIs a level-triggered vector
        routed through :meth:`KvmMsiSink.set_ioapic_route`: the userspace IOAPIC's remote-IRR clear."""
        self._eoi_handler = handler

    def _start_halt_probe(self) -> None:
        if self._probe_thread is not None:
            return
        thread = threading.Thread(target=self._halt_probe_loop, name="kvm-halt-probe", daemon=True)
        self._probe_thread = thread
        thread.start()

    def _halt_probe_loop(self) -> None:
        """Every interval, kick each vCPU that has not left KVM_RUN since the previous look (module doc
        of :mod:`pyemu.accel.kvm.vcpu`): costs two ioctls per idle vCPU per interval."""
        seen: dict[int, int] = {}
        while not self._probe_stop.wait(self._halt_probe_s):
            for vcpu in list(self._vcpus):
                entries = vcpu.run_entries
                if seen.get(vcpu.index) == entries:
                    vcpu.probe_halt(entries)
                seen[vcpu.index] = entries

