"""The local APIC's interrupt registers in C (hw/intc/apic_core.c) and as Python ints: both follow the SDM's
priority rules, and the C INTA and EOI used by the software CPU give what the Python model would."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyemu.hw.intc import apic_core
from pyemu.hw.intc.apic_core import IRR, ISR, TMR, ApicCore, PyApicCore

_module = apic_core._module.get()
needs_native = pytest.mark.skipif(_module is None, reason="the APIC core's C module could not be built")


class Reference:
    """The rules written out (SDM 10.8.3.1): what both cores must do."""

    def __init__(self) -> None:
        self.irr = self.isr = self.tmr = 0
        self.tpr = 0

    def ppr(self) -> int:
        isrv = max(self.isr.bit_length() - 1, 0)
        return self.tpr if self.tpr >> 4 >= isrv >> 4 else isrv & 0xF0

    def deliverable(self) -> int:
        vector = self.irr.bit_length() - 1
        return vector if vector >= 0 and vector >> 4 > self.ppr() >> 4 else -1


vectors = st.integers(16, 255)
operations = st.lists(st.one_of(
    st.tuples(st.just("accept"), vectors, st.booleans()),
    st.tuples(st.just("tpr"), st.integers(0, 255)),
    st.tuples(st.just("ack")),
    st.tuples(st.just("eoi")),
), max_size=60)


def cores() -> list[ApicCore | PyApicCore]:
    return [PyApicCore()] + ([ApicCore(_module)] if _module is not None else [])


@settings(max_examples=200, deadline=None)
@given(operations)
def test_cores_follow_the_priority_rules(ops: list[tuple]) -> None:
    model = Reference()
    for core in cores():
        model.__init__()  # type: ignore[misc]
        for op in ops:
            if op[0] == "accept":
                _, vector, level = op
                core.accept(vector, level)
                model.irr |= 1 << vector
                model.tmr = model.tmr | 1 << vector if level else model.tmr & ~(1 << vector)
            elif op[0] == "tpr":
                core.tpr = op[1]
                model.tpr = op[1]
            elif op[0] == "ack":
                expected = model.deliverable()
                if expected >= 0:
                    model.irr &= ~(1 << expected)
                    model.isr |= 1 << expected
                assert core.ack() == expected
            else:
                top = model.isr.bit_length() - 1
                expected_eoi = (top, bool(model.tmr >> top & 1)) if top >= 0 else (-1, False)
                if top >= 0:
                    model.isr &= ~(1 << top)
                assert core.eoi() == expected_eoi
            assert (core.get(IRR), core.get(ISR), core.get(TMR)) == (model.irr, model.isr, model.tmr)
            assert core.ppr() == model.ppr() and core.deliverable() == model.deliverable()
            assert core.tpr == model.tpr


@needs_native
def test_registers_round_trip_all_256_bits() -> None:
    core = ApicCore(_module)  # type: ignore[arg-type]
    value = (1 << 255) | (1 << 128) | (0xDEADBEEF << 32) | (1 << 16)
    for which in (IRR, ISR, TMR):
        core.set(which, value)
        assert core.get(which) == value


def _engine_ack(core: ApicCore, flag: object) -> int:
    ffi = _module.ffi  # type: ignore[union-attr]
    function, address = core.engine_ack  # type: ignore[misc]
    call = ffi.cast("int (*)(void *, int32_t *)", function)
    return int(call(ffi.cast("void *", address), flag))


def _engine_eoi(core: ApicCore) -> int:
    ffi = _module.ffi  # type: ignore[union-attr]
    function, address = core.engine_eoi  # type: ignore[misc]
    return int(ffi.cast("int (*)(void *)", function)(ffi.cast("void *", address)))


@needs_native
def test_engine_inta_moves_the_vector_and_clears_the_flag() -> None:
    core = ApicCore(_module)  # type: ignore[arg-type]
    flag = _module.ffi.new("int32_t *", 1)  # type: ignore[union-attr]
    core.set_python_ack(False)
    core.accept(0x41, False)
    core.accept(0x62, False)
    assert _engine_ack(core, flag) == 0x62
    assert flag[0] == 0  # 0x41 is blocked by 0x62 in service
    assert core.get(ISR) == 1 << 0x62 and core.get(IRR) == 1 << 0x41
    assert core.eoi() == (0x62, False)
    core.accept(0x71, False)
    flag[0] = 1
    assert _engine_ack(core, flag) == 0x71 and flag[0] == 0  # 0x41 waits for 0x71's EOI
    assert core.eoi() == (0x71, False)
    core.tpr = 0xF0
    flag[0] = 1
    assert _engine_ack(core, flag) == -1 and flag[0] == 0  # blocked by the TPR: no vector, flag cleared
    core.tpr = 0
    assert _engine_ack(core, flag) == 0x41
    assert core.engine_acks == 3


@needs_native
def test_engine_inta_and_eoi_defer_to_the_model_when_it_must_answer() -> None:
    core = ApicCore(_module)  # type: ignore[arg-type]
    flag = _module.ffi.new("int32_t *", 1)  # type: ignore[union-attr]
    core.accept(0x41, False)
    assert _engine_ack(core, flag) == apic_core.PYTHON_NEEDED  # a new core: the model answers until told
    core.set_python_ack(False)
    assert _engine_ack(core, flag) == 0x41
    core.set_python_ack(True)
    assert _engine_eoi(core) == apic_core.PYTHON_NEEDED
    assert core.get(ISR) == 1 << 0x41  # nothing changed
    core.set_python_ack(False)
    assert _engine_eoi(core) == 0x41 and core.get(ISR) == 0
    assert _engine_eoi(core) == -1  # nothing in service: nothing happens


@needs_native
def test_engine_eoi_leaves_level_triggered_vectors_to_the_model_and_says_when_to_flag_the_vcpu() -> None:
    core = ApicCore(_module)  # type: ignore[arg-type]
    core.set_python_ack(False)
    core.accept(0x50, True)
    assert core.ack() == 0x50
    assert _engine_eoi(core) == apic_core.PYTHON_NEEDED and core.get(ISR) == 1 << 0x50
    assert core.eoi() == (0x50, True)  # the model's own EOI
    core.accept(0x60, False)
    assert core.ack() == 0x60
    core.accept(0x45, False)           # blocked while 0x60 is in service
    assert _engine_eoi(core) == 0x60 | 1 << 9  # ended, and 0x45 deliverable now: flag the vCPU
    assert core.ack() == 0x45
    assert _engine_eoi(core) == 0x45 and core.engine_eois == 2
