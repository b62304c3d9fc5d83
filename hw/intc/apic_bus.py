"""The APIC bus: routes IPIs and MSIs between the userspace local APICs of a multi-CPU software machine.

On real hardware every local APIC and IOAPIC sits on one system bus and picks up the messages meant for
it. Here each vCPU owns a :class:`~pyemu.hw.intc.lapic.LocalApic`, and this object stands for the bus:

* :meth:`deliver_ipi` receives the IPIs a LAPIC sends towards other CPUs (it is every LAPIC's
  ``ipi_sink``) and hands them to the destination APICs.
* :meth:`deliver_msi` makes it the :class:`~pyemu.hw.intc.api.MsiSink` of the IOAPIC and MSI-capable
  devices, fanning each message out to the APICs its destination names.
* :meth:`mmio_page` is the one device the board registers at 0xfee00000: every CPU sees its *own* APIC at
  that address, so the page forwards each access to the APIC of the CPU that made it.

Destination decoding is the APICs' own (:meth:`LocalApic.matches_destination`: physical ID, 0xFF broadcast,
flat and cluster logical models), so the bus and a lone APIC can never disagree about who is addressed.

Lowest-priority delivery goes to exactly one APIC: the lowest arbitration priority (APR) among the
addressed, software-enabled APICs; ties go to the lowest APIC ID (then the lowest CPU index, if a guest gave
two APICs one ID). That rule is stateless, so nothing needs saving with a snapshot and tests are
deterministic; it does not rotate between equal candidates. Linux 6.1 programs the IOAPIC and MSIs for fixed
delivery anyway. Focus-processor checking is not modelled (Pentium 4 and later do not do it either).

Threads: everything here runs under the machine lock, which the callers (exit dispatcher, timer thread,
device threads) hold; the bus keeps no locks of its own. The APICs' ``kick``/``event_kick`` callbacks it
triggers may wake other vCPU threads, which then take the lock themselves.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Sequence

from pyemu.hw.intc.errors import InterruptControllerError, InvalidPropertyError
from pyemu.hw.intc.lapic import (
    DM_EXTINT,
    DM_FIXED,
    DM_LOWEST,
    SHORTHAND_ALL,
    SHORTHAND_NONE,
    SHORTHAND_OTHERS,
    SHORTHAND_SELF,
    Ipi,
    LocalApic,
    decode_msi,
)
from pyemu.system import log


MAX_ROUTES = 256
"""Fixed-delivery routes remembered at once (a board has a few dozen interrupt sources)."""


class CurrentCpuError(InterruptControllerError):
    """The board's ``current_cpu()`` named no CPU on this APIC bus: a wiring bug (an access to the APIC
    page from a thread that is not a vCPU, or a CPU index the bus was not built with)."""

    def __init__(self, message: str, *, cpu: object, cpus: int) -> None:
        super().__init__(message, device="apic-bus")
        self.cpu = cpu
        self.cpus = cpus


class CurrentApicPage:
    """The xAPIC MMIO page as the bus sees it: one device at 0xfee00000 that is a different APIC for each
    CPU. Register it on the MMIO bus (length ``APIC_PAGE_SIZE``) instead of any single LocalApic."""

    def __init__(self, bus: ApicBus) -> None:
        self._bus = bus

    def read(self, offset: int, size: int) -> int:
        return self._bus.current_lapic().read(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self._bus.current_lapic().write(offset, size, value)


class ApicBus:
    """Connects ``lapics`` (index = CPU index) and becomes each one's ``ipi_sink``.

    ``current_cpu()`` returns the index of the CPU whose thread is running now (the vCPU that made an MMIO
    access); it is only asked by the :meth:`mmio_page` device.
    """

    def __init__(self, lapics: Sequence[LocalApic], current_cpu: Callable[[], int]) -> None:
        if not lapics:
            raise InvalidPropertyError("apic-bus: needs at least one local APIC", device="apic-bus",
                                       name="lapics", value=0)
        self.lapics: tuple[LocalApic, ...] = tuple(lapics)
        self.current_cpu = current_cpu
        self._routes: dict[tuple[int, int], tuple[int, bool, tuple[LocalApic, ...]]] = {}
        for index, lapic in enumerate(self.lapics):
            # Each APIC's sink knows its sender by CPU index: APIC IDs are guest-writable and may collide.
            lapic.ipi_sink = partial(self.deliver_ipi, source_index=index)
            lapic.destination_changed = self._routes.clear
        self._page = CurrentApicPage(self)

    # -- the APIC page -----------------------------------------------------------------------------------
    def mmio_page(self) -> CurrentApicPage:
        """The device for the MMIO bus at 0xfee00000, forwarding to the current CPU's APIC."""
        return self._page

    def current_lapic(self) -> LocalApic:
        """The APIC of the CPU running now; :class:`CurrentCpuError` if ``current_cpu()`` names none."""
        cpu = self.current_cpu()
        if type(cpu) is not int or not 0 <= cpu < len(self.lapics):
            raise CurrentCpuError(
                f"apic-bus: current CPU {cpu!r} is not one of the {len(self.lapics)} CPUs on the APIC bus",
                cpu=cpu, cpus=len(self.lapics),
            )
        return self.lapics[cpu]

    # -- IPIs --------------------------------------------------------------------------------------------
    def deliver_ipi(self, ipi: Ipi, source_index: int | None = None) -> None:
        """Deliver an IPI that the APIC of CPU ``source_index`` sent (see ``LocalApic._send_ipi`` for the
        sender's share). Shorthand ALL and OTHERS reach every CPU but the sender (under ALL the sender has
        delivered to itself); a destination field reaches every matching APIC but the sender. Lowest
        priority is the exception: the sender leaves it entirely to the bus, which picks one APIC among all
        the targets, the sender included when the shorthand or destination includes it.

        ``source_index`` None (an IPI not from one of our APICs) means the sender is the first APIC with
        ``ipi.source_id``, or no APIC at all.
        """
        if source_index is None:
            source_index = next((i for i, lapic in enumerate(self.lapics) if lapic.apic_id == ipi.source_id), None)
        mode = ipi.delivery_mode
        if mode == DM_EXTINT:
            log.log("unimp", f"apic-bus: ExtINT IPI from APIC {ipi.source_id} not supported; dropped")
            return
        if ipi.shorthand == SHORTHAND_SELF:
            log.log("guest_errors", f"apic-bus: self-shorthand IPI from APIC {ipi.source_id} reached the bus; "
                                    "the sender delivers those itself, dropped")
            return
        lowest = mode == DM_LOWEST
        targets: list[int] = []
        sender_addressed = False
        for index, lapic in enumerate(self.lapics):
            if ipi.shorthand in (SHORTHAND_ALL, SHORTHAND_OTHERS):
                addressed = not (index == source_index and ipi.shorthand == SHORTHAND_OTHERS)
            else:
                addressed = lapic.matches_destination(ipi.destination, ipi.logical)
            if index == source_index:
                sender_addressed = addressed
                if not lowest:
                    continue  # the sender has delivered to itself already
            if addressed:
                targets.append(index)
        if lowest:
            winner = self._lowest_priority(targets)
            targets = [] if winner is None else [winner]
        if not targets:
            # Not a mistake when only the sender was addressed (it served itself) or OTHERS on one CPU.
            if lowest or (ipi.shorthand == SHORTHAND_NONE and not sender_addressed):
                log.log("guest_errors", f"apic-bus: IPI mode {mode} vector {ipi.vector:#x} from APIC "
                                        f"{ipi.source_id} to {_describe(ipi.logical, ipi.destination, ipi.shorthand)}"
                                        f" reaches no {'enabled ' if lowest else ''}APIC; dropped")
            return
        if log.enabled("int"):
            log.log("int", f"apic-bus: IPI mode {mode} vector {ipi.vector:#x} from APIC {ipi.source_id} "
                           f"-> CPUs {targets}")
        for index in targets:
            self.lapics[index].accept_ipi(ipi)

    # -- MSIs (the MsiSink protocol) ---------------------------------------------------------------------
    def fixed_target(self, address: int, data: int) -> LocalApic | None:
        """The one APIC a fixed, edge-triggered MSI of ``address``/``data`` reaches and that accepts it now,
        else None (several APICs, lowest priority, none): see :meth:`LocalApic.fixed_target`."""
        message = decode_msi(address, data)
        if message is None:
            return None
        targets = [lapic for lapic in self.lapics if lapic.matches_destination(message.destination, message.logical)]
        return targets[0].fixed_target(address, data) if len(targets) == 1 else None

    def deliver_msi(self, address: int, data: int) -> None:
        """One MSI from the IOAPIC or a device: decoded like a lone APIC does (:func:`decode_msi`), then
        accepted by every APIC the destination names (one for lowest priority). An address outside
        0xFEExxxxx, or a destination no APIC answers to, is logged under ``guest_errors`` and dropped.

        A fixed-delivery message's route (vector, trigger mode, destination APICs) is remembered until an
        APIC's ID, LDR or DFR changes (:attr:`LocalApic.destination_changed`): a device's interrupt then
        costs one dictionary lookup and the APIC's own acceptance, not a decode and a destination match per
        APIC (on this project's hosts the whole way from an I/O thread's pulse to IRR took ~15 µs).
        Lowest-priority messages are arbitrated each time; they depend on the APICs' priorities."""
        route = self._routes.get((address, data))
        if route is not None and not log.enabled("int"):
            vector, level_triggered, lapics = route
            for lapic in lapics:
                lapic.accept_fixed(vector, level_triggered)
            return
        message = decode_msi(address, data)
        if message is None:
            log.log("guest_errors", f"apic-bus: MSI to address {address:#x} outside 0xfeexxxxx dropped")
            return
        targets = [i for i, lapic in enumerate(self.lapics)
                   if lapic.matches_destination(message.destination, message.logical)]
        lowest = message.delivery_mode == DM_LOWEST
        if lowest:
            winner = self._lowest_priority(targets)
            targets = [] if winner is None else [winner]
        if not targets:
            log.log("guest_errors", f"apic-bus: MSI vector {message.vector:#x} for "
                                    f"{_describe(message.logical, message.destination, SHORTHAND_NONE)} reaches "
                                    f"no {'enabled ' if lowest else ''}APIC; dropped")
            return
        if message.delivery_mode == DM_FIXED:
            if len(self._routes) >= MAX_ROUTES:  # the guest chooses the messages: keep the cache bounded
                self._routes.clear()
            self._routes[(address, data)] = (message.vector, message.level_triggered,
                                             tuple(self.lapics[index] for index in targets))
        for index in targets:
            self.lapics[index].accept_msi(message)

    # -- lowest-priority arbitration ---------------------------------------------------------------------
    def _lowest_priority(self, candidates: Sequence[int]) -> int | None:
        """The CPU index among ``candidates`` whose enabled APIC has the lowest arbitration priority; ties
        to the lowest APIC ID, then the lowest index. None if no candidate APIC is enabled (a disabled
        APIC would drop the interrupt, so it never wins the arbitration)."""
        best: tuple[int, int, int] | None = None
        for index in candidates:
            lapic = self.lapics[index]
            if not (lapic.software_enabled and lapic.hardware_enabled):
                continue
            key = (lapic.arbitration_priority(), lapic.apic_id, index)
            if best is None or key < best:
                best = key
        return None if best is None else best[2]


def _describe(logical: bool, destination: int, shorthand: int) -> str:
    """A message's destination in words, for log lines."""
    if shorthand == SHORTHAND_ALL:
        return "all CPUs"
    if shorthand == SHORTHAND_OTHERS:
        return "all other CPUs"
    return f"{'logical' if logical else 'physical'} destination {destination:#x}"
