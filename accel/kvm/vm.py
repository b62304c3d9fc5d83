"""One KVM virtual machine: memory slots, the split irqchip, MSI delivery, irqfd/ioeventfd.

Why the *split* irqchip: the local APICs (timer, IPIs, INIT/SIPI, EOI, TPR) are on the hot path of every
interrupt and live best in the kernel, while the IOAPIC is a plain register machine that pyemu already has
in userspace for the software CPU. With ``KVM_CAP_SPLIT_IRQCHIP`` the kernel keeps only the LAPICs, the
userspace IOAPIC turns pin changes into MSI messages, and :meth:`KvmVm.signal_msi` hands them to the
in-kernel LAPICs; both accelerators then share one IOAPIC model. The GSI routing table mirrors the
IOAPIC's redirection entries so the kernel knows which vectors are level-triggered and reports their EOI
(``KVM_EXIT_IOAPIC_EOI``) back to the userspace IOAPIC.
"""

from __future__ import annotations

from pyemu.accel.kvm import abi
from pyemu.accel.kvm.abi import ffi
from pyemu.accel.kvm.errors import KvmError
from pyemu.accel.kvm.fd import KvmFd
from pyemu.accel.kvm.system import KvmSystem

# Three pages KVM needs for real-mode emulation on Intel (TSS) and the EPT identity map; QEMU's choice,
# just below the BIOS area and away from the IOAPIC (0xfec00000) and LAPIC (0xfee00000) windows.
IDENTITY_MAP_ADDR = 0xFEFFC000
TSS_ADDR = 0xFEFFD000

IOAPIC_PINS = 24
APIC_BUS_CYCLE_NS = 40  # 25 MHz: pyemu's CPUID crystal (target/x86/cpuid.py TSC_CRYSTAL_HZ)
KVM_DEFAULT_APIC_BUS_HZ = 1_000_000_000  # the in-kernel LAPIC's fixed bus before Linux 6.10


class KvmVm:
    """The VM fd and its VM-wide state. Create vCPUs only after construction (the irqchip mode and the
    APIC bus frequency are VM-wide and must precede the first vCPU)."""

    def __init__(self, system: KvmSystem, *, ioapic_pins: int = IOAPIC_PINS) -> None:
        self.system = system
        self.fd = KvmFd(system.fd.ioctl(abi.KVM_CREATE_VM, 0), "VM")
        try:
            self.fd.ioctl(abi.KVM_SET_IDENTITY_MAP_ADDR, ffi.new("uint64_t *", IDENTITY_MAP_ADDR))
            self.fd.ioctl(abi.KVM_SET_TSS_ADDR, TSS_ADDR)
            self.enable_cap(abi.KVM_CAP_SPLIT_IRQCHIP, ioapic_pins)
            self.ioapic_pins = ioapic_pins
            self.apic_bus_hz = self._set_apic_bus()
        except KvmError:
            self.fd.close()
            raise
        self._slots: dict[int, tuple[int, int, int]] = {}
        self._routes: dict[int, tuple[int, int]] = {}
        self._msi = ffi.new("struct kvm_msi *")

    def _set_apic_bus(self) -> int:
        """Run the in-kernel LAPIC timer at pyemu's crystal frequency where the kernel allows it, so the
        CPUID leaf 0x15 the guest reads is the same on both accelerators; else report KVM's fixed 1 GHz."""
        if self.system.check_extension(abi.KVM_CAP_X86_APIC_BUS_CYCLES_NS):
            self.enable_cap(abi.KVM_CAP_X86_APIC_BUS_CYCLES_NS, APIC_BUS_CYCLE_NS)
            return 1_000_000_000 // APIC_BUS_CYCLE_NS
        return KVM_DEFAULT_APIC_BUS_HZ

    def enable_cap(self, cap: int, *args: int) -> None:
        request = ffi.new("struct kvm_enable_cap *")
        request.cap = cap
        for i, value in enumerate(args):
            request.args[i] = value
        self.fd.ioctl(abi.KVM_ENABLE_CAP, request)

    # -- memory ---------------------------------------------------------------------------------------
    def set_memory_region(self, slot: int, gpa: int, size: int, host_addr: int, *, readonly: bool = False,
                          log_dirty: bool = False) -> None:
        """Map ``size`` bytes of host memory at ``host_addr`` to guest-physical ``gpa`` (size 0 deletes).
        ``log_dirty``: KVM records the pages the guest writes (KVM_MEM_LOG_DIRTY_PAGES; the flag can be
        changed on a registered slot while vCPUs run)."""
        region = ffi.new("struct kvm_userspace_memory_region *")
        region.slot = slot
        region.flags = (abi.KVM_MEM_READONLY if readonly else 0) | (abi.KVM_MEM_LOG_DIRTY_PAGES if log_dirty else 0)
        region.guest_phys_addr = gpa
        region.memory_size = size
        region.userspace_addr = host_addr
        self.fd.ioctl(abi.KVM_SET_USER_MEMORY_REGION, region)
        if size:
            self._slots[slot] = (gpa, size, host_addr)
        else:
            self._slots.pop(slot, None)

    def get_dirty_log(self, slot: int, size: int) -> bytes:
        """The bitmap (bit n = page n of the slot) of pages written since the last call, which KVM clears
        and write-protects again (KVM_GET_DIRTY_LOG without manual protection)."""
        bitmap = ffi.new("uint64_t[]", max(1, (size // 4096 + 63) // 64))
        log = ffi.new("struct kvm_dirty_log *")
        log.slot = slot
        log.dirty_bitmap = int(ffi.cast("uintptr_t", bitmap))
        self.fd.ioctl(abi.KVM_GET_DIRTY_LOG, log)
        return bytes(ffi.buffer(bitmap))

    @property
    def slots(self) -> dict[int, tuple[int, int, int]]:
        """slot -> (gpa, size, host address) as registered."""
        return dict(self._slots)

    # -- interrupts -----------------------------------------------------------------------------------
    def signal_msi(self, address: int, data: int) -> bool:
        """Inject one MSI into the in-kernel LAPICs; False when the guest blocked it (APIC disabled...).

        Not thread-safe on its own: callers serialise (the MSI sink holds a lock)."""
        msi = self._msi
        msi.address_lo = address & 0xFFFFFFFF
        msi.address_hi = address >> 32
        msi.data = data & 0xFFFFFFFF
        return self.fd.ioctl(abi.KVM_SIGNAL_MSI, msi) > 0

    def set_route(self, gsi: int, message: tuple[int, int] | None) -> None:
        """Describe IOAPIC pin ``gsi`` as the MSI ``(address, data)`` it currently sends, or None when the
        pin is masked. Only the table is updated; call :meth:`commit_routes` to hand it to KVM."""
        if message is None:
            self._routes.pop(gsi, None)
        else:
            self._routes[gsi] = message

    def commit_routes(self) -> None:
        """KVM_SET_GSI_ROUTING with every route set so far (KVM replaces the whole table)."""
        count = len(self._routes)
        raw = ffi.new(
            "char[]", ffi.sizeof("struct kvm_irq_routing") + count * ffi.sizeof("struct kvm_irq_routing_entry")
        )
        table = ffi.cast("struct kvm_irq_routing *", raw)
        table.nr = count
        for i, (gsi, (address, data)) in enumerate(sorted(self._routes.items())):
            entry = table.entries[i]
            entry.gsi = gsi
            entry.type = abi.KVM_IRQ_ROUTING_MSI
            entry.u.msi.address_lo = address & 0xFFFFFFFF
            entry.u.msi.address_hi = address >> 32
            entry.u.msi.data = data
        self.fd.ioctl(abi.KVM_SET_GSI_ROUTING, table)

    def set_irqfd(self, eventfd: int, gsi: int, *, assign: bool = True) -> None:
        """Let a write to ``eventfd`` raise the route ``gsi`` in the kernel (no exit, no Python)."""
        request = ffi.new("struct kvm_irqfd *")
        request.fd = eventfd
        request.gsi = gsi
        request.flags = 0 if assign else abi.KVM_IRQFD_FLAG_DEASSIGN
        self.fd.ioctl(abi.KVM_IRQFD, request)

    def set_ioeventfd(
        self, eventfd: int, addr: int, length: int, *, pio: bool, datamatch: int | None = None, assign: bool = True
    ) -> None:
        """Turn guest writes of ``length`` bytes at ``addr`` (port or MMIO) into an eventfd signal without
        leaving the kernel: the fast path for virtio queue notifications."""
        request = ffi.new("struct kvm_ioeventfd *")
        request.addr = addr
        request.len = length
        request.fd = eventfd
        flags = abi.KVM_IOEVENTFD_FLAG_PIO if pio else 0
        if datamatch is not None:
            flags |= abi.KVM_IOEVENTFD_FLAG_DATAMATCH
            request.datamatch = datamatch
        if not assign:
            flags |= abi.KVM_IOEVENTFD_FLAG_DEASSIGN
        request.flags = flags
        self.fd.ioctl(abi.KVM_IOEVENTFD, request)

    # -- vCPUs ----------------------------------------------------------------------------------------
    def create_vcpu_fd(self, vcpu_id: int) -> KvmFd:
        return KvmFd(self.fd.ioctl(abi.KVM_CREATE_VCPU, vcpu_id), f"vCPU {vcpu_id}")

    def close(self) -> None:
        self.fd.close()
