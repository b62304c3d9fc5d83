"""MC146818 real-time clock and CMOS RAM (ports 0x70 index / 0x71 data; IRQ8).

The clock is the host's UTC time when the device is created, advanced by the machine's virtual clock
(the :class:`~pyemu.system.timers.TimerQueue`), plus an offset the guest sets by writing the time. So tests
with a fake clock are deterministic, and a guest that sets its clock keeps it relative to the host.

Nothing ticks: the time registers are computed when read, and the status flags of register C are computed
from time ranges when C is read ("has a periodic boundary / second boundary / alarm second passed since the
last read?"). Timers are armed only for enabled interrupt sources (PIE: at the periodic rate; UIE or AIE:
once a second), which is when the IRQ line must rise at the right moment.

While the SET bit is on, or the divider is held in reset (register A bits 6-5 = 11), the clock is stopped
and the time registers are plain storage; when both are released the clock restarts from the registers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, ClassVar, Mapping

from pyemu.hw.core.irq import IrqLine
from pyemu.hw.core.state import DeviceState, StateError, check_range, check_state
from pyemu.hw.timer.errors import CmosContentsError
from pyemu.system import log
from pyemu.system.timers import TimerQueue

RTC_BASE = 0x70
RTC_PORT_COUNT = 2
CMOS_SIZE = 128
NS_PER_S = 1_000_000_000
OSCILLATOR_HZ = 32_768
# UIP rises this long before each update (datasheet: 244 us at 32.768 kHz).
UIP_LEAD_NS = 244_000

REG_SECONDS = 0x00
REG_SECONDS_ALARM = 0x01
REG_MINUTES = 0x02
REG_MINUTES_ALARM = 0x03
REG_HOURS = 0x04
REG_HOURS_ALARM = 0x05
REG_DAY_OF_WEEK = 0x06
REG_DAY_OF_MONTH = 0x07
REG_MONTH = 0x08
REG_YEAR = 0x09
REG_A = 0x0A
REG_B = 0x0B
REG_C = 0x0C
REG_D = 0x0D
REG_CENTURY = 0x32
FIRST_RAM_BYTE = 0x0E
TIME_REGISTERS = (REG_SECONDS, REG_MINUTES, REG_HOURS, REG_DAY_OF_WEEK, REG_DAY_OF_MONTH, REG_MONTH, REG_YEAR,
                  REG_CENTURY)

A_UIP = 0x80
A_DIVIDER_RESET = 0x60
B_SET = 0x80
B_PIE = 0x40
B_AIE = 0x20
B_UIE = 0x10
B_SQWE = 0x08
B_BINARY = 0x04
B_24H = 0x02
B_DSE = 0x01
C_IRQF = 0x80
C_PF = 0x40
C_AF = 0x20
C_UF = 0x10
D_VRT = 0x80
#: Bound on saved guest times (either side of 1970): the end of year 9999, beyond what the registers can show.
_MAX_GUEST_NS = 253402300800 * NS_PER_S

RESET_A = 0x26  # oscillator on (DV = 010), 1024 Hz periodic rate
RESET_B = B_24H  # 24-hour BCD, no interrupts (QEMU's default)


def periodic_cycles(rate_select: int) -> int:
    """32.768 kHz cycles per periodic interrupt for a rate-select value (0 = none): 1 and 2 repeat 8 and 9
    (256 Hz and 128 Hz), 3 = 8192 Hz ... 15 = 2 Hz."""
    if rate_select == 0:
        return 0
    if rate_select <= 2:
        rate_select += 7
    return 1 << (rate_select - 1)


#: The periodic interrupt's longest interval (rate select 15: 2 Hz), bounding a saved periodic timer.
_MAX_PERIODIC_NS = periodic_cycles(15) * NS_PER_S // OSCILLATOR_HZ
_FLAG_BITS = C_IRQF | C_PF | C_AF | C_UF


@dataclass(frozen=True, kw_only=True)
class RtcState(DeviceState):
    """The RTC as data. Guest times (``epoch_ns``, ``stopped_at_ns``, ``flags_since_ns``) are UTC; the
    machine's timer clock appears only as durations relative to the moment the state was taken, so the
    state restores correctly whatever that clock reads on the restoring machine: ``epoch_ns`` is the guest
    time at that moment and the ``*_remaining_ns`` fields say how long after it the armed interrupt timers
    were due (None: not armed; 0: due or overdue)."""

    VERSION: ClassVar[int] = 1

    cmos: bytes
    index: int
    nmi_disabled: bool
    epoch_ns: int  # guest UTC time in ns when the state was taken (of a running clock)
    stopped_at_ns: int | None  # guest time the clock was stopped at (SET / divider reset), or None
    flags: int  # register C bits latched by the interrupt timers
    flags_since_ns: int  # guest time of the last read of register C
    periodic_remaining_ns: int | None
    update_remaining_ns: int | None


class Rtc:
    """MC146818 RTC with 128 bytes of CMOS. Register it at 0x70 (2 ports); ``irq`` is IRQ8.

    ``cmos``: initial RAM bytes by index (0x0e-0x7f), e.g. from
    :func:`~pyemu.hw.timer.cmos.pc_cmos_memory_layout`. The century byte (0x32) is kept by the clock.
    ``host_time_ns``: the host's UTC clock, read once at creation and at :meth:`reset`.
    """

    def __init__(
        self,
        queue: TimerQueue,
        irq: IrqLine | None = None,
        *,
        cmos: Mapping[int, int] | None = None,
        host_time_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self._queue = queue
        self.irq = irq
        self._host_time_ns = host_time_ns
        self._initial = bytearray(CMOS_SIZE)
        for index, value in (cmos or {}).items():
            if not FIRST_RAM_BYTE <= index < CMOS_SIZE:
                raise CmosContentsError(f"rtc: CMOS byte {index:#x} is not RAM (0x0e-0x7f)", index=index,
                                        value=value)
            if not 0 <= value <= 0xFF:
                raise CmosContentsError(f"rtc: CMOS byte {index:#x} value {value} is not 0-255", index=index,
                                        value=value)
            self._initial[index] = value
        self._periodic_timer = queue.new_timer(self._on_periodic, "rtc-periodic")
        self._update_timer = queue.new_timer(self._on_update, "rtc-update")
        self.reset()

    def reset(self) -> None:
        """Power-on: CMOS RAM back to the board's contents, the clock back to host time."""
        self._periodic_timer.cancel()
        self._update_timer.cancel()
        self.cmos = bytearray(self._initial)
        self.cmos[REG_A] = RESET_A
        self.cmos[REG_B] = RESET_B
        self.cmos[REG_D] = D_VRT
        self.index = 0
        self.nmi_disabled = False
        self._epoch_ns = self._host_time_ns()
        self._clock_ns = self._queue.now()
        self._stopped_at: int | None = None
        self._flags = 0
        self._flags_since = self.guest_time_ns()
        self._set_irq(0)
        self._refresh_time_registers()

    # -- the clock ---------------------------------------------------------------------------------------
    def guest_time_ns(self) -> int:
        """The RTC's current time: UTC nanoseconds since 1970."""
        if self._stopped_at is not None:
            return self._stopped_at
        return self._epoch_ns + (self._queue.now() - self._clock_ns)

    def _clock_at_guest(self, guest_ns: int) -> int:
        """Virtual-clock time at which the (running) RTC shows ``guest_ns``."""
        return self._clock_ns + (guest_ns - self._epoch_ns)

    def _set_guest_time(self, guest_ns: int) -> None:
        self._epoch_ns = guest_ns
        self._clock_ns = self._queue.now()
        self._flags_since = guest_ns

    @property
    def running(self) -> bool:
        return self._stopped_at is None

    def _divider_running(self) -> bool:
        return (self.cmos[REG_A] & A_DIVIDER_RESET) != A_DIVIDER_RESET

    # -- encoding ----------------------------------------------------------------------------------------
    @property
    def binary(self) -> bool:
        return bool(self.cmos[REG_B] & B_BINARY)

    def _encode(self, value: int) -> int:
        return value if self.binary else ((value // 10) << 4) | (value % 10)

    def _decode(self, value: int) -> int | None:
        if self.binary:
            return value
        high, low = value >> 4, value & 0xF
        if high > 9 or low > 9:
            return None
        return high * 10 + low

    def _encode_hour(self, hour: int) -> int:
        if self.cmos[REG_B] & B_24H:
            return self._encode(hour)
        pm = 0x80 if hour >= 12 else 0
        return self._encode(hour % 12 or 12) | pm

    def _decode_hour(self, value: int) -> int | None:
        if self.cmos[REG_B] & B_24H:
            return self._decode(value)
        hour = self._decode(value & 0x7F)
        if hour is None or not 1 <= hour <= 12:
            return None
        return hour % 12 + (12 if value & 0x80 else 0)

    def _refresh_time_registers(self) -> None:
        """Write the clock's current time into the time registers (they are storage while stopped)."""
        if not self.running:
            return
        tm = time.gmtime(self.guest_time_ns() // NS_PER_S)
        self.cmos[REG_SECONDS] = self._encode(tm.tm_sec)
        self.cmos[REG_MINUTES] = self._encode(tm.tm_min)
        self.cmos[REG_HOURS] = self._encode_hour(tm.tm_hour)
        self.cmos[REG_DAY_OF_WEEK] = self._encode((tm.tm_wday + 1) % 7 + 1)  # Sunday = 1
        self.cmos[REG_DAY_OF_MONTH] = self._encode(tm.tm_mday)
        self.cmos[REG_MONTH] = self._encode(tm.tm_mon)
        self.cmos[REG_YEAR] = self._encode(tm.tm_year % 100)
        self.cmos[REG_CENTURY] = self._encode(tm.tm_year // 100 % 100)

    def _time_from_registers(self) -> int | None:
        """Seconds since 1970 the time registers describe, or None if they hold an impossible date."""
        import calendar  # only when the guest sets the clock: it brings datetime, ~3 ms of every start
        sec = self._decode(self.cmos[REG_SECONDS])
        minute = self._decode(self.cmos[REG_MINUTES])
        hour = self._decode_hour(self.cmos[REG_HOURS])
        day = self._decode(self.cmos[REG_DAY_OF_MONTH])
        month = self._decode(self.cmos[REG_MONTH])
        year = self._decode(self.cmos[REG_YEAR])
        century = self._decode(self.cmos[REG_CENTURY])
        if century is None or not 19 <= century <= 99:
            century = 20
        fields = (sec, minute, hour, day, month, year)
        if any(f is None for f in fields):
            return None
        assert sec is not None and minute is not None and hour is not None
        assert day is not None and month is not None and year is not None
        if sec > 59 or minute > 59 or hour > 23 or not 1 <= month <= 12 or year > 99:
            return None
        full_year = century * 100 + year
        if not 1 <= day <= calendar.monthrange(full_year, month)[1]:
            return None
        return calendar.timegm((full_year, month, day, hour, minute, sec, 0, 0, 0))

    def _apply_register_time(self) -> None:
        """The guest wrote the time: keep it as an offset from the host clock (sub-second phase kept)."""
        seconds = self._time_from_registers()
        if seconds is None:
            log.log("guest_errors", "rtc: time registers hold an invalid date/time; clock not changed")
            return
        phase = self.guest_time_ns() % NS_PER_S if self._stopped_at is None else 0
        self._set_guest_time(seconds * NS_PER_S + phase)

    # -- bus interface -----------------------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if offset == 0:
            return 0xFF  # the index port is write-only
        return self.read_register(self.index)

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        if offset == 0:
            self.index = value & 0x7F
            self.nmi_disabled = bool(value & 0x80)  # bit 7 gates NMI on a PC; not part of the index
        else:
            self.write_register(self.index, value)

    def read_register(self, index: int) -> int:
        index &= 0x7F
        if index in TIME_REGISTERS:
            self._refresh_time_registers()
            return self.cmos[index]
        if index == REG_A:
            return self.cmos[REG_A] | (A_UIP if self._update_in_progress() else 0)
        if index == REG_C:
            return self._read_c()
        if index == REG_D:
            return D_VRT
        return self.cmos[index]

    def write_register(self, index: int, value: int) -> None:
        index &= 0x7F
        if index in TIME_REGISTERS or index in (REG_SECONDS_ALARM, REG_MINUTES_ALARM, REG_HOURS_ALARM):
            if index in TIME_REGISTERS and self.running:
                self._refresh_time_registers()
                self.cmos[index] = value
                self._apply_register_time()
            else:
                self.cmos[index] = value
            self._rearm()
        elif index == REG_A:
            self._write_a(value)
        elif index == REG_B:
            self._write_b(value)
        elif index in (REG_C, REG_D):
            log.log("guest_errors", f"rtc: write {value:#x} to read-only register {index:#x} ignored")
        else:
            self.cmos[index] = value

    def _write_a(self, value: int) -> None:
        was_running = self.running
        self.cmos[REG_A] = value & 0x7F  # UIP is read-only
        self._update_stopped(was_running)
        self._rearm()

    def _write_b(self, value: int) -> None:
        was_running = self.running
        old = self.cmos[REG_B]
        if was_running:
            self._refresh_time_registers()
        if value & B_SET:
            value &= ~B_UIE  # setting SET clears UIE (datasheet)
        self.cmos[REG_B] = value
        if (old ^ value) & (B_BINARY | B_24H) and not self.running:
            log.log("unimp", "rtc: data-mode change while the clock is stopped; registers not converted")
        self._update_stopped(was_running)
        # Enabling a source whose flag is already set raises IRQF at once.
        self._latch_flags()
        self._update_irqf()
        self._rearm()

    def _update_stopped(self, was_running: bool) -> None:
        stop = bool(self.cmos[REG_B] & B_SET) or not self._divider_running()
        if stop and was_running:
            self._latch_flags()
            self._refresh_time_registers()
            self._stopped_at = self.guest_time_ns()
        elif not stop and not was_running:
            self._stopped_at = None
            self._apply_register_time()

    def _update_in_progress(self) -> bool:
        if not self.running:
            return False
        return self.guest_time_ns() % NS_PER_S >= NS_PER_S - UIP_LEAD_NS

    # -- status flags ------------------------------------------------------------------------------------
    def _periodic_ns(self) -> tuple[int, int]:
        """(numerator, denominator) of the periodic interval in guest ns, or (0, 1) if disabled."""
        cycles = periodic_cycles(self.cmos[REG_A] & 0x0F)
        return (cycles * NS_PER_S, OSCILLATOR_HZ) if cycles else (0, 1)

    def _periodic_index(self, guest_ns: int) -> int:
        num, den = self._periodic_ns()
        return guest_ns * den // num

    def _latch_flags(self) -> None:
        """Fold the boundaries passed since the last read of C into the flags (nothing ticks in between)."""
        if not self.running:
            return
        now = self.guest_time_ns()
        since = self._flags_since
        if now <= since:
            return
        num, _ = self._periodic_ns()
        if num and self._periodic_index(now) > self._periodic_index(since):
            self._flags |= C_PF
        if now // NS_PER_S > since // NS_PER_S:
            self._flags |= C_UF
            alarm = self._next_alarm(since // NS_PER_S)
            if alarm is not None and alarm <= now // NS_PER_S:
                self._flags |= C_AF
        self._flags_since = now

    def _read_c(self) -> int:
        self._latch_flags()
        value = self._flags
        self._flags = 0
        self._set_irq(0)
        return value

    def _update_irqf(self) -> None:
        enabled = self.cmos[REG_B] & (B_PIE | B_AIE | B_UIE)
        sources = ((B_PIE, C_PF), (B_AIE, C_AF), (B_UIE, C_UF))
        if any(enabled & enable and self._flags & flag for enable, flag in sources):
            if not self._flags & C_IRQF:
                self._flags |= C_IRQF
                self._set_irq(1)

    def _set_irq(self, level: int) -> None:
        if self.irq is not None and (level or self.irq.level):
            self.irq.set_level(level)

    # -- alarm -------------------------------------------------------------------------------------------
    def _alarm_field(self, index: int, hour: bool = False) -> int | None:
        """Alarm register value in binary, or -1 for "don't care" (top two bits set), None if invalid."""
        value = self.cmos[index]
        if value & 0xC0 == 0xC0:
            return -1
        return self._decode_hour(value) if hour else self._decode(value)

    def _next_alarm(self, after_second: int) -> int | None:
        """The first second after ``after_second`` (epoch seconds) whose time of day matches the alarm."""
        want_s = self._alarm_field(REG_SECONDS_ALARM)
        want_m = self._alarm_field(REG_MINUTES_ALARM)
        want_h = self._alarm_field(REG_HOURS_ALARM, hour=True)
        if want_s is None or want_m is None or want_h is None:
            return None
        t = after_second + 1
        limit = t + 2 * 86400
        while t <= limit:
            day_second = t % 86400
            h, m, s = day_second // 3600, day_second // 60 % 60, day_second % 60
            if want_h != -1 and h != want_h:
                t += 3600 - day_second % 3600
            elif want_m != -1 and m != want_m:
                t += 60 - s
            elif want_s != -1 and s != want_s:
                t += 1
            else:
                return t
        return None

    # -- interrupt timers --------------------------------------------------------------------------------
    def _rearm(self) -> None:
        """Arm the timers the enabled sources need (only those: an idle RTC costs nothing)."""
        b = self.cmos[REG_B]
        now = self.guest_time_ns()
        num, den = self._periodic_ns()
        if self.running and b & B_PIE and num:
            nxt = self._periodic_index(now) + 1
            self._periodic_timer.mod(self._clock_at_guest(-(-nxt * num // den)))
        else:
            self._periodic_timer.cancel()
        if self.running and b & (B_UIE | B_AIE):
            self._update_timer.mod(self._clock_at_guest((now // NS_PER_S + 1) * NS_PER_S))
        else:
            self._update_timer.cancel()

    def _on_periodic(self) -> None:
        self._latch_flags()
        self._flags |= C_PF
        self._update_irqf()
        self._rearm()

    def _on_update(self) -> None:
        self._latch_flags()
        self._flags |= C_UF
        second = self.guest_time_ns() // NS_PER_S
        if self._next_alarm(second - 1) == second:
            self._flags |= C_AF
        self._update_irqf()
        self._rearm()

    # -- state -------------------------------------------------------------------------------------------
    def state(self) -> RtcState:
        """CMOS, clock and flags now; the clock anchor and the interrupt timers relative to now."""
        now = self._queue.now()
        periodic_ns = self._periodic_timer.expire_ns
        update_ns = self._update_timer.expire_ns
        return RtcState(
            cmos=bytes(self.cmos), index=self.index, nmi_disabled=self.nmi_disabled,
            epoch_ns=self._epoch_ns + (now - self._clock_ns), stopped_at_ns=self._stopped_at, flags=self._flags,
            flags_since_ns=self._flags_since,
            periodic_remaining_ns=None if periodic_ns is None else max(0, periodic_ns - now),
            update_remaining_ns=None if update_ns is None else max(0, update_ns - now),
        )

    def from_state(self, state: DeviceState) -> None:
        """Load a saved state: CMOS, clock, latched flags, the IRQ8 level and the interrupt timers (re-armed
        relative to now). Everything is checked first: on :class:`StateError` nothing changes."""
        s = check_state("rtc", state, RtcState)
        if not isinstance(s.cmos, bytes) or len(s.cmos) != CMOS_SIZE:
            raise StateError("rtc", f"cmos must be {CMOS_SIZE} bytes, not {s.cmos!r:.40}")
        if s.cmos[REG_A] & A_UIP:
            raise StateError("rtc", f"register A={s.cmos[REG_A]:#x} stores the read-only UIP bit")
        check_range("rtc", "index", s.index, 0, 0x7F)
        if not isinstance(s.nmi_disabled, bool):
            raise StateError("rtc", f"nmi_disabled={s.nmi_disabled!r} is not a bool")
        # Guest times are UTC nanoseconds, negative before 1970; no RTC date is more than 10000 years away.
        for name in ("epoch_ns", "flags_since_ns"):
            check_range("rtc", name, getattr(s, name), -_MAX_GUEST_NS, _MAX_GUEST_NS)
        stop = bool(s.cmos[REG_B] & B_SET) or s.cmos[REG_A] & A_DIVIDER_RESET == A_DIVIDER_RESET
        if s.stopped_at_ns is not None:
            check_range("rtc", "stopped_at_ns", s.stopped_at_ns, -_MAX_GUEST_NS, _MAX_GUEST_NS)
        if stop != (s.stopped_at_ns is not None):
            raise StateError("rtc", f"the clock is {'stopped' if s.stopped_at_ns is not None else 'running'} "
                                    f"but registers A/B say it is {'stopped' if stop else 'running'}")
        check_range("rtc", "flags", s.flags, 0, _FLAG_BITS)
        if s.flags & ~_FLAG_BITS:
            raise StateError("rtc", f"flags={s.flags:#x} sets bits outside register C's {_FLAG_BITS:#x}")
        # The timers run exactly for the enabled sources of a running clock (see _rearm): anything else
        # would raise an interrupt the guest did not ask for, or lose one it did.
        b = s.cmos[REG_B]
        periodic_wanted = not stop and bool(b & B_PIE) and periodic_cycles(s.cmos[REG_A] & 0x0F) > 0
        update_wanted = not stop and bool(b & (B_UIE | B_AIE))
        for name, remaining, wanted, limit in (
            ("periodic_remaining_ns", s.periodic_remaining_ns, periodic_wanted, _MAX_PERIODIC_NS + 1),
            ("update_remaining_ns", s.update_remaining_ns, update_wanted, NS_PER_S),
        ):
            if remaining is not None:
                check_range("rtc", name, remaining, 0, limit)
            if wanted != (remaining is not None):
                raise StateError("rtc", f"{name}={remaining!r} but registers A/B "
                                        f"{'enable' if wanted else 'do not enable'} that interrupt")

        self._periodic_timer.cancel()
        self._update_timer.cancel()
        now = self._queue.now()
        self.cmos = bytearray(s.cmos)
        self.index = s.index
        self.nmi_disabled = s.nmi_disabled
        self._epoch_ns, self._clock_ns = s.epoch_ns, now
        self._stopped_at = s.stopped_at_ns
        self._flags = s.flags
        self._flags_since = s.flags_since_ns
        if self.irq is not None:
            self.irq.set_level(1 if self._flags & C_IRQF else 0)
        if s.periodic_remaining_ns is not None:
            self._periodic_timer.mod(now + s.periodic_remaining_ns)
        if s.update_remaining_ns is not None:
            self._update_timer.mod(now + s.update_remaining_ns)
