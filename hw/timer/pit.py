"""The 8254 programmable interval timer: three 16-bit down-counters at 1.193182 MHz (ports 0x40-0x43), plus
the port 0x61 bits that gate channel 2 and show its output.

Counters are arithmetic on virtual time: a channel remembers how many input clocks had elapsed at an
*anchor* and whether it is counting; its count and OUT are computed when read. Only channel 0's OUT is
wired to an interrupt (IRQ0), and only its transitions are scheduled on the
:class:`~pyemu.system.timers.TimerQueue`, each at the exact clock tick where OUT changes, so a periodic
mode-2 timer gives one rising edge per period.

Linux uses channel 0 for its tick until the LAPIC timer takes over (and ``check_timer`` verifies IRQ0
through the IOAPIC), and channel 2 with port 0x61 as a calibration source when nothing better exists: both
must count correctly in virtual time.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from dataclasses import fields as dataclass_fields
from typing import ClassVar

from pyemu.hw.core.irq import IrqLine
from pyemu.hw.core.state import DeviceState, StateError, check_range, check_state
from pyemu.system import log
from pyemu.system.timers import TimerQueue

PIT_HZ = 1_193_182
NS_PER_S = 1_000_000_000
PIT_BASE = 0x40
PIT_PORT_COUNT = 4
SPEAKER_PORT = 0x61

# Read/write access modes (control word bits 5:4).
RW_LATCH, RW_LSB, RW_MSB, RW_WORD = range(4)

# Channel 0 edges closer together than this are spread out: a guest programming count 2 would otherwise
# ask the timer thread for 600,000 callbacks a second. The counter itself still reads exact values.
MIN_IRQ_INTERVAL_NS = 20_000
# If the timer thread falls this many periods behind (host stall), skip to the present instead of
# replaying every missed edge at once (the PIC would merge them anyway).
MAX_CATCH_UP_PERIODS = 4


def _to_bcd(value: int) -> int:
    return ((value // 1000 % 10) << 12) | ((value // 100 % 10) << 8) | ((value // 10 % 10) << 4) | (value % 10)


def _from_bcd(value: int) -> int:
    digits = [(value >> shift) & 0xF for shift in (12, 8, 4, 0)]
    return sum(min(d, 9) * 10**p for d, p in zip(digits, (3, 2, 1, 0)))


@dataclass
class PitChannel:
    """One channel's live registers (mutable; :class:`PitChannelState` is its saved form)."""

    mode: int = 0
    rw_mode: int = RW_WORD
    bcd: bool = False
    gate: int = 1
    count: int = 0x10000  # reload value, 0 written = 65536 (10000 in BCD)
    loaded: bool = False  # a count has been written since the last control word
    counting: bool = False
    anchor_ns: int = 0
    anchor_ticks: int = 0  # input clocks elapsed since the count was loaded, at anchor_ns
    null_count: bool = True
    write_low_pending: bool = False
    write_latch: int = 0
    read_high_next: bool = False
    latched_value: int | None = None
    latched_high_next: bool = False
    latched_status: int | None = None


@dataclass(frozen=True, kw_only=True)
class PitChannelState:
    """One channel as data. The same fields as :class:`PitChannel`, except that the anchor is saved as
    ``anchor_age_ns``, how long before the state was taken the channel was anchored, so the state does not
    depend on what the timer clock read at the time."""

    mode: int = 0
    rw_mode: int = RW_WORD
    bcd: bool = False
    gate: int = 1
    count: int = 0x10000
    loaded: bool = False
    counting: bool = False
    anchor_age_ns: int = 0
    anchor_ticks: int = 0
    null_count: bool = True
    write_low_pending: bool = False
    write_latch: int = 0
    read_high_next: bool = False
    latched_value: int | None = None
    latched_high_next: bool = False
    latched_status: int | None = None


_CHANNEL_FLAGS = ("bcd", "loaded", "counting", "null_count", "write_low_pending", "read_high_next",
                  "latched_high_next")
#: Upper bound for saved durations and tick counts (about 292 years of nanoseconds).
_MAX_NS = (1 << 63) - 1


@dataclass(frozen=True, kw_only=True)
class PitState(DeviceState):
    """The three channels, the port 0x61 bits and channel 0's interrupt schedule.

    ``irq_next_tick`` is the channel-0 clock count of the scheduled OUT transition and ``irq_remaining_ns``
    how long after the state was taken it was due (0: due or overdue); both None if none was armed.
    """

    VERSION: ClassVar[int] = 1

    channels: tuple[PitChannelState, ...]
    speaker_data: int
    port61_low: int
    irq_level: int
    irq_next_tick: int | None
    irq_remaining_ns: int | None


class Pit:
    """8254 PIT. Register it at 0x40 (4 ports); ``irq0`` is channel 0's OUT (ISA IRQ0); the port 0x61 bits
    live in :attr:`speaker` (register ``pit.speaker`` at 0x61, 1 port)."""

    def __init__(self, queue: TimerQueue, irq0: IrqLine | None = None) -> None:
        self._queue = queue
        self.irq0 = irq0
        self._timer = queue.new_timer(self._on_irq_timer, "pit-ch0")
        self.speaker = PitSpeakerPort(self)
        self.reset()

    def reset(self) -> None:
        """Every channel in mode 3 with count 65536, as QEMU resets it (what a BIOS leaves behind): channel 0
        runs at 18.2 Hz, channel 2 waits for its gate (port 0x61 bit 0, reset low)."""
        self._timer.cancel()
        now = self._queue.now()
        self.channels = [
            PitChannel(mode=3, gate=0 if n == 2 else 1, loaded=True, counting=n != 2, anchor_ns=now,
                            null_count=False)
            for n in range(3)
        ]
        self._irq_level = 0
        self._irq_tick = 0  # the channel-0 clock count of the next scheduled OUT transition
        self.speaker_data = 0
        self.port61_low = 0
        if self.irq0 is not None:
            self.irq0.set_level(0)
        self._restart_irq()

    # -- time arithmetic ---------------------------------------------------------------------------------
    @staticmethod
    def _ticks(ns: int) -> int:
        return max(0, ns) * PIT_HZ // NS_PER_S

    @staticmethod
    def _tick_ns(ticks: int) -> int:
        return -(-ticks * NS_PER_S // PIT_HZ)

    def _elapsed(self, ch: PitChannel, now: int | None = None) -> int:
        """Input clocks since the count was loaded (frozen while the channel does not count)."""
        if not ch.counting:
            return ch.anchor_ticks
        now = self._queue.now() if now is None else now
        return ch.anchor_ticks + self._ticks(now - ch.anchor_ns)

    def _modulus(self, ch: PitChannel) -> int:
        return 10000 if ch.bcd and ch.count == 0x10000 else ch.count

    def _period(self, ch: PitChannel) -> int:
        """Reload value used as the period of modes 2 and 3 (count 1 is illegal there; treated as 2)."""
        return max(2, self._modulus(ch))

    def _count_at(self, ch: PitChannel, d: int) -> int:
        modulus = self._modulus(ch)
        if not ch.loaded:
            return 0
        if ch.mode in (2, 3):
            period = self._period(ch)
            if ch.mode == 3:
                # Mode 3 decrements by two each clock and reloads twice per period.
                half = period - ((2 * d) % period)
                return half
            return period - (d % period)
        wrap = 10000 if ch.bcd else 0x10000
        return (modulus - d) % wrap

    def _out_at(self, ch: PitChannel, d: int) -> int:
        """OUT after ``d`` input clocks of counting (datasheet waveforms)."""
        if not ch.loaded:
            return 0 if ch.mode == 0 else 1  # a control word sets OUT low for mode 0, high otherwise
        modulus = self._modulus(ch)
        if ch.mode == 0:
            return 1 if d >= modulus else 0
        if ch.mode == 1:
            return 1 if not ch.counting and d == 0 else (1 if d >= modulus else 0)
        if ch.mode in (2, 3):
            if not ch.counting:
                return 1  # gate low forces OUT high
            period = self._period(ch)
            phase = d % period
            if ch.mode == 2:
                return 0 if phase == period - 1 else 1
            return 1 if phase < (period + 1) // 2 else 0
        # modes 4 and 5: one clock low at terminal count
        return 0 if d == modulus else 1

    def _next_transition(self, ch: PitChannel, d: int) -> int | None:
        """The first clock count after ``d`` at which OUT changes, or None if it stays put."""
        if not ch.loaded or not ch.counting:
            return None
        modulus = self._modulus(ch)
        if ch.mode in (0, 1):
            return modulus if d < modulus else None
        if ch.mode in (4, 5):
            if d < modulus:
                return modulus
            return modulus + 1 if d == modulus else None
        period = self._period(ch)
        base = d - d % period
        phase = d % period
        if ch.mode == 2:
            return base + period - 1 if phase < period - 1 else base + period
        half = (period + 1) // 2
        return base + half if phase < half else base + period

    # -- channel 0 interrupt -----------------------------------------------------------------------------
    def _restart_irq(self) -> None:
        """Channel 0 was (re)programmed: drive IRQ0 from its OUT now and schedule the next transition."""
        ch = self.channels[0]
        self._timer.cancel()
        d = self._elapsed(ch)
        self._set_irq(self._out_at(ch, d))
        self._irq_tick = d
        self._schedule_irq(d, self._queue.now())

    def _schedule_irq(self, d: int, earliest_ns: int) -> None:
        ch = self.channels[0]
        nxt = self._next_transition(ch, d)
        if nxt is None:
            return
        self._irq_tick = nxt
        deadline = ch.anchor_ns + self._tick_ns(nxt - ch.anchor_ticks)
        self._timer.mod(max(deadline, earliest_ns))

    def _on_irq_timer(self) -> None:
        ch = self.channels[0]
        tick = self._irq_tick
        now = self._queue.now()
        period = self._period(ch)
        if ch.mode in (2, 3) and self._elapsed(ch, now) - tick > MAX_CATCH_UP_PERIODS * period:
            # Far behind: emit one period's worth (low, then the rising edge of the current period).
            present = self._elapsed(ch, now)
            tick = present - present % period
            self._set_irq(0)
        level = self._out_at(ch, tick)
        self._set_irq(level)
        spacing = MIN_IRQ_INTERVAL_NS if level else 0
        self._schedule_irq(tick, now + spacing)

    def _set_irq(self, level: int) -> None:
        self._irq_level = level
        if self.irq0 is not None:
            self.irq0.set_level(level)

    # -- bus interface -----------------------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if size != 1:
            log.log("guest_errors", f"pit: {size}-byte read at offset {offset}")
        if offset >= 3:
            return 0xFF  # the control register is write-only; the bus floats
        return self._read_channel(self.channels[offset])

    def write(self, offset: int, size: int, value: int) -> None:
        if size != 1:
            log.log("guest_errors", f"pit: {size}-byte write at offset {offset}; low byte used")
        value &= 0xFF
        if offset == 3:
            self._write_control(value)
        elif 0 <= offset < 3:
            self._write_count(offset, value)

    def _read_channel(self, ch: PitChannel) -> int:
        if ch.latched_status is not None:
            status, ch.latched_status = ch.latched_status, None
            return status
        if ch.latched_value is not None:
            value = ch.latched_value
            if ch.rw_mode == RW_LSB:
                ch.latched_value = None
                return value & 0xFF
            if ch.rw_mode == RW_MSB:
                ch.latched_value = None
                return (value >> 8) & 0xFF
            if ch.latched_high_next:
                ch.latched_value = None
                ch.latched_high_next = False
                return (value >> 8) & 0xFF
            ch.latched_high_next = True
            return value & 0xFF
        value = self._readable_count(ch)
        if ch.rw_mode == RW_LSB:
            return value & 0xFF
        if ch.rw_mode == RW_MSB:
            return (value >> 8) & 0xFF
        high, ch.read_high_next = ch.read_high_next, not ch.read_high_next
        return (value >> 8) & 0xFF if high else value & 0xFF

    def _readable_count(self, ch: PitChannel) -> int:
        count = self._count_at(ch, self._elapsed(ch)) & 0xFFFF if ch.loaded else 0
        if ch.bcd:
            return _to_bcd(count % 10000)
        return count

    def _status_byte(self, ch: PitChannel) -> int:
        out = self._out_at(ch, self._elapsed(ch))
        return (out << 7) | (int(ch.null_count) << 6) | (ch.rw_mode << 4) | (ch.mode << 1) | int(ch.bcd)

    def _write_control(self, value: int) -> None:
        select = value >> 6
        if select == 3:
            self._read_back(value)
            return
        ch = self.channels[select]
        access = (value >> 4) & 3
        if access == RW_LATCH:
            if ch.latched_value is None:
                ch.latched_value = self._readable_count(ch)
                ch.latched_high_next = False
            return
        mode = (value >> 1) & 7
        if mode > 5:
            mode -= 4  # 6 and 7 are aliases of 2 and 3
        # A control word stops the counter until a new count is written (OUT takes its initial level).
        self.channels[select] = ch = replace(
            ch, mode=mode, rw_mode=access, bcd=bool(value & 1), loaded=False, counting=False, anchor_ticks=0,
            null_count=True, write_low_pending=False, read_high_next=False, latched_value=None,
            latched_high_next=False,
        )
        if select == 0:
            self._restart_irq()

    def _read_back(self, value: int) -> None:
        """Read-back command: latch count (bit 5 clear) and/or status (bit 4 clear) of the selected channels
        (bits 1-3)."""
        for n in range(3):
            if not value & (2 << n):
                continue
            ch = self.channels[n]
            if not value & 0x20 and ch.latched_value is None:
                ch.latched_value = self._readable_count(ch)
                ch.latched_high_next = False
            if not value & 0x10 and ch.latched_status is None:
                ch.latched_status = self._status_byte(ch)

    def _write_count(self, n: int, value: int) -> None:
        ch = self.channels[n]
        if ch.rw_mode == RW_LSB:
            self._load(n, value)
        elif ch.rw_mode == RW_MSB:
            self._load(n, value << 8)
        elif not ch.write_low_pending:
            ch.write_latch = value
            ch.write_low_pending = True
        else:
            ch.write_low_pending = False
            self._load(n, ch.write_latch | (value << 8))

    def _load(self, n: int, raw: int) -> None:
        ch = self.channels[n]
        count = _from_bcd(raw) if ch.bcd else raw
        if count == 0:
            count = 0x10000  # 0 means the maximum: 65536 binary (10000 BCD, handled by _modulus)
        ch.count = count
        ch.null_count = False
        ch.loaded = True
        ch.anchor_ns = self._queue.now()
        ch.anchor_ticks = 0
        # Modes 1 and 5 wait for a gate trigger; the others count while the gate is high.
        ch.counting = ch.mode not in (1, 5) and bool(ch.gate)
        if n == 0:
            self._restart_irq()

    # -- gates (channel 2 is the only one with a software-controlled gate) --------------------------------
    def set_gate(self, n: int, level: int) -> None:
        ch = self.channels[n]
        level = 1 if level else 0
        if level == ch.gate:
            return
        now = self._queue.now()
        rising = level and not ch.gate
        if ch.loaded:
            if ch.mode in (0, 4):
                # Gate low suspends counting; high resumes it where it stopped.
                if not level:
                    ch.anchor_ticks = self._elapsed(ch, now)
                    ch.counting = False
                else:
                    ch.anchor_ns = now
                    ch.counting = True
            elif rising:
                # Modes 1, 5: trigger; modes 2, 3: restart the period.
                ch.anchor_ns = now
                ch.anchor_ticks = 0
                ch.counting = True
            elif ch.mode in (2, 3):
                ch.anchor_ticks = 0
                ch.counting = False
        ch.gate = level
        if n == 0:
            self._restart_irq()

    def out(self, n: int) -> int:
        """The current OUT level of channel ``n``."""
        ch = self.channels[n]
        return self._out_at(ch, self._elapsed(ch))

    def count(self, n: int) -> int:
        """The current count of channel ``n`` (binary), for tests and the monitor."""
        ch = self.channels[n]
        return self._count_at(ch, self._elapsed(ch)) if ch.loaded else 0

    # -- state -------------------------------------------------------------------------------------------
    def state(self) -> PitState:
        """The channels and channel 0's interrupt schedule, with times relative to now."""
        now = self._queue.now()
        expire_ns = self._timer.expire_ns
        return PitState(
            channels=tuple(self._save_channel(ch, now) for ch in self.channels),
            speaker_data=self.speaker_data,
            port61_low=self.port61_low,
            irq_level=self._irq_level,
            irq_next_tick=None if expire_ns is None else self._irq_tick,
            irq_remaining_ns=None if expire_ns is None else max(0, expire_ns - now),
        )

    @staticmethod
    def _save_channel(ch: PitChannel, now: int) -> PitChannelState:
        fields = {f.name: getattr(ch, f.name) for f in dataclass_fields(PitChannel) if f.name != "anchor_ns"}
        return PitChannelState(anchor_age_ns=now - ch.anchor_ns, **fields)

    @staticmethod
    def _load_channel(saved: PitChannelState, now: int) -> PitChannel:
        fields = {f.name: getattr(saved, f.name) for f in dataclass_fields(PitChannelState)
                  if f.name != "anchor_age_ns"}
        return PitChannel(anchor_ns=now - saved.anchor_age_ns, **fields)

    def from_state(self, state: DeviceState) -> None:
        """Load a saved state, re-arming channel 0's interrupt relative to now and driving IRQ0 to the saved
        level. Everything is checked first: on :class:`StateError` nothing changes."""
        s = check_state("pit", state, PitState)
        if not isinstance(s.channels, tuple) or len(s.channels) != 3:
            raise StateError("pit", f"channels must be a tuple of 3, not {s.channels!r}")
        for n, ch in enumerate(s.channels):
            self._check_channel(n, ch)
        check_range("pit", "speaker_data", s.speaker_data, 0, 1)
        check_range("pit", "port61_low", s.port61_low, 0, 0xF)
        check_range("pit", "irq_level", s.irq_level, 0, 1)
        if (s.irq_next_tick is None) != (s.irq_remaining_ns is None):
            raise StateError("pit", "irq_next_tick and irq_remaining_ns must both be set or both be None")
        if s.irq_next_tick is not None and s.irq_remaining_ns is not None:
            check_range("pit", "irq_next_tick", s.irq_next_tick, 0, _MAX_NS)
            check_range("pit", "irq_remaining_ns", s.irq_remaining_ns, 0, _MAX_NS)
            if not (s.channels[0].loaded and s.channels[0].counting):
                raise StateError("pit", "channel 0 interrupt armed while channel 0 does not count")

        self._timer.cancel()
        now = self._queue.now()
        self.channels = [self._load_channel(ch, now) for ch in s.channels]
        self.speaker_data = s.speaker_data
        self.port61_low = s.port61_low
        self._set_irq(s.irq_level)
        self._irq_tick = 0
        if s.irq_next_tick is not None and s.irq_remaining_ns is not None:
            self._irq_tick = s.irq_next_tick
            self._timer.mod(now + s.irq_remaining_ns)

    @staticmethod
    def _check_channel(n: int, ch: object) -> None:
        """StateError unless ``ch`` is a channel state whose fields an 8254 channel can hold."""
        if not isinstance(ch, PitChannelState):
            raise StateError("pit", f"channels[{n}] must be PitChannelState, not {type(ch).__name__}")
        prefix = f"channels[{n}]."
        check_range("pit", prefix + "mode", ch.mode, 0, 5)
        check_range("pit", prefix + "rw_mode", ch.rw_mode, RW_LSB, RW_WORD)
        check_range("pit", prefix + "gate", ch.gate, 0, 1)
        check_range("pit", prefix + "count", ch.count, 1, 0x10000)
        check_range("pit", prefix + "anchor_age_ns", ch.anchor_age_ns, 0, _MAX_NS)
        check_range("pit", prefix + "anchor_ticks", ch.anchor_ticks, 0, _MAX_NS)
        check_range("pit", prefix + "write_latch", ch.write_latch, 0, 0xFF)
        if ch.latched_value is not None:
            check_range("pit", prefix + "latched_value", ch.latched_value, 0, 0xFFFF)
        if ch.latched_status is not None:
            check_range("pit", prefix + "latched_status", ch.latched_status, 0, 0xFF)
        for name in _CHANNEL_FLAGS:
            if not isinstance(getattr(ch, name), bool):
                raise StateError("pit", f"{prefix}{name}={getattr(ch, name)!r} is not a bool")


class PitSpeakerPort:
    """Port 0x61 (NMI status and control): bit 0 gates channel 2, bit 1 enables the speaker data, bits 2-3
    are NMI enables (stored); bit 4 toggles with DRAM refresh (every 15.085 us), bit 5 is channel 2's OUT,
    bits 6-7 (NMI sources) read 0."""

    REFRESH_PERIOD_NS = 15_085

    def __init__(self, pit: Pit) -> None:
        self._pit = pit

    def read(self, offset: int, size: int) -> int:
        pit = self._pit
        refresh = (pit._queue.now() // self.REFRESH_PERIOD_NS) & 1
        return (pit.port61_low & 0x0F) | (refresh << 4) | (pit.out(2) << 5)

    def write(self, offset: int, size: int, value: int) -> None:
        pit = self._pit
        pit.port61_low = value & 0x0F
        pit.speaker_data = (value >> 1) & 1
        pit.set_gate(2, value & 1)
