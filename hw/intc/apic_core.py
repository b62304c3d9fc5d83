"""A local APIC's interrupt registers (IRR, ISR, TMR, TPR) where the software CPU's INTA reaches them in C.

Why: under the software CPU the engine asks for the vector of an interrupt it takes inside a run (the
block gate's ``take_interrupts_in_engine``). Answered by the Python model, that INTA needed the GIL on the
vCPU's thread: measured 2026-12-07 with virtio-blk 1 MiB reads, ~21 µs of Python per interrupt (cold
caches after the guest's own work) plus ~17 µs from the I/O thread's release of the GIL to the callback's
first line, on the critical path of every request (an interrupt costs the guest ~40 µs before its
handler runs; QEMU's INTA is a few C lines), and the handler's EOI write ~6 µs more through the device
window's Python. :func:`apic_core` gives an :class:`ApicCore` (the registers in C memory, ``apic_core.c``,
built at first use like pyemu's other small C modules) whose ``engine_ack`` the accelerator hands to the
engine and whose ``engine_eoi`` serves the EOI register in the vCPU's device window: both then run in C,
without Python or the GIL, whenever the model says they may (:meth:`ApicCore.set_python_ack`: no PIC
passed through, no timer tick owed; an EOI also only for an edge-triggered vector). Where no C module
can be built, :class:`PyApicCore` keeps them as Python ints and the Python model answers every INTA and
EOI, as before. Measured 2026-12-07 (``virtio.py``-style guest, both builds up at once, ten paired samples
each): sequential 1 MiB reads +8%, writes +6%, 4 KiB random reads +18% against the Python INTA and EOI.

Both keep the same rules as :class:`~pyemu.hw.intc.lapic.LocalApic` (SDM 10.8): the PPR is the TPR or the
class of the highest in-service vector, whichever is higher; a requested vector is deliverable when its
class beats the PPR's; INTA moves it from IRR to ISR; EOI ends the highest in-service vector.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any, Callable

from pyemu.system import log
from pyemu.system.native import OptionalNative

CDEF = """
struct pyemu_apic_core {
    int32_t lock;
    uint32_t irr[8], isr[8], tmr[8];
    uint32_t tpr;
    int32_t python_ack;
    uint64_t engine_acks;
    uint64_t engine_eois;
};
void pyemu_apic_accept(struct pyemu_apic_core *c, int vector, int level_triggered);
int pyemu_apic_deliverable(struct pyemu_apic_core *c);
int pyemu_apic_ack(struct pyemu_apic_core *c);
int pyemu_apic_eoi(struct pyemu_apic_core *c);
uint32_t pyemu_apic_ppr(struct pyemu_apic_core *c);
void pyemu_apic_get(struct pyemu_apic_core *c, int which, uint32_t *out);
void pyemu_apic_set(struct pyemu_apic_core *c, int which, const uint32_t *in);
uint32_t pyemu_apic_get_tpr(struct pyemu_apic_core *c);
void pyemu_apic_set_tpr(struct pyemu_apic_core *c, uint32_t tpr);
int pyemu_apic_engine_ack(struct pyemu_apic_core *c, int32_t *irq_pending);
int pyemu_apic_engine_eoi(struct pyemu_apic_core *c);
void pyemu_irq_routes_changed(void);
uint32_t pyemu_irq_routes_now(void);
struct pyemu_irq_route {
    uint32_t aimed_at;
    int32_t armed;
    struct pyemu_apic_core *core;
    int32_t vector;
    uint32_t *status;
    uint32_t status_bits;
    uint64_t posts;
    int32_t *halt_poll;
    int32_t *irq_pending;
    int32_t *attention;
    uint64_t kicks;
};
int pyemu_irq_route_post(void *opaque);
int pyemu_irq_route_kick(void *opaque);
"""
SOURCE = Path(__file__).with_name("apic_core.c")

IRR, ISR, TMR = 0, 1, 2
"""Which register :meth:`ApicCore.get` and :meth:`ApicCore.set` mean."""

PYTHON_NEEDED = -2
"""What the C INTA returns when the Python model must answer instead."""

_module = OptionalNative("apic_core", [SOURCE], CDEF, what="the local APIC's interrupt registers in C",
                         without="the Python model answers every INTA")


def _highest(bits: int) -> int:
    return bits.bit_length() - 1


class PyApicCore:
    """The registers as Python ints: every caller holds the board's lock, and no INTA runs in C."""

    engine_ack: tuple[int, int] | None = None
    """No C INTA (see :attr:`ApicCore.engine_ack`)."""
    engine_eoi: tuple[int, int] | None = None
    """No C EOI (see :attr:`ApicCore.engine_eoi`)."""

    def __init__(self) -> None:
        self._banks = [0, 0, 0]
        self.tpr = 0
        self.engine_acks = 0
        self.engine_eois = 0

    def get(self, which: int) -> int:
        return self._banks[which]

    def set(self, which: int, value: int) -> None:
        self._banks[which] = value

    def accept(self, vector: int, level_triggered: bool) -> None:
        bit = 1 << vector
        self._banks[IRR] |= bit
        self._banks[TMR] = self._banks[TMR] | bit if level_triggered else self._banks[TMR] & ~bit

    def ppr(self) -> int:
        isrv = max(_highest(self._banks[ISR]), 0)
        return self.tpr if (self.tpr >> 4) >= (isrv >> 4) else isrv & 0xF0

    def deliverable(self) -> int:
        vector = _highest(self._banks[IRR])
        return vector if vector >= 0 and (vector >> 4) > (self.ppr() >> 4) else -1

    def ack(self) -> int:
        vector = self.deliverable()
        if vector >= 0:
            self._banks[IRR] &= ~(1 << vector)
            self._banks[ISR] |= 1 << vector
        return vector

    def eoi(self) -> tuple[int, bool]:
        """The vector ended (-1: none) and whether TMR marks it level-triggered."""
        vector = _highest(self._banks[ISR])
        if vector < 0:
            return -1, False
        self._banks[ISR] &= ~(1 << vector)
        return vector, bool(self._banks[TMR] >> vector & 1)

    def set_python_ack(self, needed: bool) -> None:
        """Nothing to tell: every INTA is the Python model's already."""


class ApicCore:
    """The registers in C (``apic_core.c``), each access one call under the core's spinlock."""

    __slots__ = ("_ffi", "_lib", "_core", "_words", "_python_ack", "engine_ack", "engine_eoi")

    def __init__(self, module: ModuleType) -> None:
        ffi: Any = module.ffi
        self._ffi = ffi
        self._lib = module.lib
        self._core = ffi.new("struct pyemu_apic_core *")  # zeroed; freed with this object
        self._words = ffi.new("uint32_t[8]")
        self._python_ack = True
        self._core.python_ack = 1
        self.engine_ack: tuple[int, int] | None = (
            int(ffi.cast("uintptr_t", ffi.addressof(self._lib, "pyemu_apic_engine_ack"))),
            int(ffi.cast("uintptr_t", self._core)))
        """``(address of pyemu_apic_engine_ack, address of the core)``: the C INTA an accelerator may call
        as ``int (*)(void *core, int32_t *irq_pending)``, -2 meaning "ask the Python model"."""
        self.engine_eoi: tuple[int, int] | None = (
            int(ffi.cast("uintptr_t", ffi.addressof(self._lib, "pyemu_apic_engine_eoi"))),
            int(ffi.cast("uintptr_t", self._core)))
        """``(address of pyemu_apic_engine_eoi, address of the core)``: the guest's EOI write in C, as
        ``int (*)(void *core)`` (see ``apic_core.c``), -2 meaning "write it to the Python model"."""

    @property
    def tpr(self) -> int:
        return int(self._lib.pyemu_apic_get_tpr(self._core))

    @tpr.setter
    def tpr(self, value: int) -> None:
        self._lib.pyemu_apic_set_tpr(self._core, value & 0xFF)

    @property
    def engine_acks(self) -> int:
        """INTAs the engine had answered in C."""
        return int(self._core.engine_acks)

    @property
    def engine_eois(self) -> int:
        """EOI writes served in C."""
        return int(self._core.engine_eois)

    def get(self, which: int) -> int:
        words = self._words
        self._lib.pyemu_apic_get(self._core, which, words)
        return int.from_bytes(self._ffi.buffer(words), "little")

    def set(self, which: int, value: int) -> None:
        words = self._words
        self._ffi.buffer(words)[:] = value.to_bytes(32, "little")
        self._lib.pyemu_apic_set(self._core, which, words)

    def accept(self, vector: int, level_triggered: bool) -> None:
        self._lib.pyemu_apic_accept(self._core, vector, 1 if level_triggered else 0)

    def ppr(self) -> int:
        return int(self._lib.pyemu_apic_ppr(self._core))

    def deliverable(self) -> int:
        return int(self._lib.pyemu_apic_deliverable(self._core))

    def ack(self) -> int:
        return int(self._lib.pyemu_apic_ack(self._core))

    def eoi(self) -> tuple[int, bool]:
        ended = int(self._lib.pyemu_apic_eoi(self._core))
        return (-1, False) if ended < 0 else (ended & 0xFF, bool(ended & 0x100))

    def set_python_ack(self, needed: bool) -> None:
        """Whether an INTA must be the Python model's (it knows when: a PIC passed through, a timer tick
        owed); otherwise the engine's INTA may run in C."""
        if needed != self._python_ack:
            self._python_ack = needed
            self._core.python_ack = 1 if needed else 0


def apic_core() -> ApicCore | PyApicCore:
    """The registers of one local APIC: in C where the module builds, else as Python ints."""
    module = _module.get()
    return ApicCore(module) if module is not None else PyApicCore()


def routes_changed() -> None:
    """Something that could move or stop a device's interrupt route changed (an IOAPIC redirection entry,
    an APIC's ID, destination format or enables): every :class:`NativeRoute` aimed before is stale."""
    module = _module.get()
    if module is not None:
        module.lib.pyemu_irq_routes_changed()


class NativeRoute:
    """One device interrupt that C code (virtio-blk's data plane) may post itself: into the IRR of the APIC
    its IOAPIC pin names, with the device's status bits set, as the models' pulse would. Why: from the
    host read's end to the vCPU's flags the I/O thread spent ~32 µs in the models' Python per request
    (pulse, IOAPIC, APIC acceptance; measured 2026-12-07 with 1 MiB virtio-blk reads). The device aims it
    after each interrupt it raises through the models (:meth:`aim`), which is when a route can be known;
    :func:`routes_changed` makes every aimed route stale until then. The poster kicks the vCPU
    afterwards (:meth:`kick`): a vCPU waits for an interrupt through Python."""

    def __init__(self, module: ModuleType, status_address: int, status_bits: int) -> None:
        ffi: Any = module.ffi
        self._ffi = ffi
        self._lib = module.lib
        self.state: Any = ffi.new("struct pyemu_irq_route *")
        self.state.status = ffi.cast("uint32_t *", status_address)
        self.state.status_bits = status_bits
        self._kick: Callable[[], None] | None = None
        self.function = int(ffi.cast("uintptr_t", ffi.addressof(self._lib, "pyemu_irq_route_post")))
        self.address = int(ffi.cast("uintptr_t", self.state))
        """``int (*)(void *route)`` and its argument, for the C poster."""
        self.kick_function = int(ffi.cast("uintptr_t", ffi.addressof(self._lib, "pyemu_irq_route_kick")))
        """``int (*)(void *route)``: the kick after a post by a C caller without the GIL (1: done in C, 0: the
        caller must :meth:`kick`); it wakes in C only a vCPU that spins at a HLT inside its run."""

    def aim(self, target: tuple[Any, int] | None) -> None:
        """Point the route at ``(apic, vector)`` -- an APIC whose :attr:`engine_route_core` is in C -- or
        disarm it (None). The generation is read first: a change after it makes the route stale. With
        ``-d int`` nothing is armed: every interrupt then goes through the models, which log it."""
        state = self.state
        state.armed = 0
        if target is None or log.enabled("int"):
            return
        apic, vector = target
        core = apic.engine_route_core
        if core is None:
            return
        state.aimed_at = self._lib.pyemu_irq_routes_now()
        state.core = self._ffi.cast("struct pyemu_apic_core *", core)
        state.vector = vector
        self._kick = apic.kick_if_pending
        words = apic.wake_words
        if words is None:
            state.halt_poll = state.irq_pending = state.attention = self._ffi.NULL
        else:
            state.halt_poll, state.irq_pending, state.attention = (
                self._ffi.cast("int32_t *", word) for word in words)
        state.armed = 1

    def post(self) -> bool:
        """Post the interrupt from Python (one C call instead of the models' pulse); False, with nothing
        done, when the route is stale or unarmed. The caller kicks after a post."""
        return bool(self._lib.pyemu_irq_route_post(self._ffi.cast("void *", self.state)))

    @property
    def stale(self) -> bool:
        """Unarmed, or aimed before the last :func:`routes_changed`."""
        return not self.state.armed or self.state.aimed_at != self._lib.pyemu_irq_routes_now()

    def kick(self) -> None:
        """After a post: wake the vCPU of the APIC the route named, if the interrupt is deliverable."""
        if self._kick is not None:
            self._kick()

    @property
    def posts(self) -> int:
        return int(self.state.posts)

    @property
    def kicks_in_c(self) -> int:
        """vCPU kicks done in C (:attr:`kick_function`)."""
        return int(self.state.kicks)


def native_route(status_address: int, status_bits: int) -> NativeRoute | None:
    """A route a device's C code may post through, setting ``status_bits`` in the 32-bit word at
    ``status_address`` (the device's interrupt status register), or None where the APIC core is Python's."""
    module = _module.get()
    return NativeRoute(module, status_address, status_bits) if module is not None else None
