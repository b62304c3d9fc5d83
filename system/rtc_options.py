"""``-rtc [base=utc|localtime|DATE][,clock=host|rt|vm][,driftfix=none|slew]``: where the guest's RTC starts.

The RTC model (:class:`~pyemu.hw.timer.rtc.Rtc`) asks a "host time" source for the time to show at
power-on and at reset; this option decides what that source returns:

* ``utc`` (default): the host's UTC time;
* ``localtime``: the host's local wall-clock time (what Windows guests expect in the CMOS clock);
* ``DATE`` (``2006-06-17T16:01:21`` or ``2006-06-17``, read as UTC as QEMU does): the clock starts at that
  date, and a reset brings it back to DATE plus the time the VM has existed -- QEMU keeps the offset
  between DATE and the host clock fixed at start-up, and so does :meth:`RtcOptions.time_source`.

``clock=host`` and ``clock=vm`` are accepted: pyemu's RTC reads the board's clock once and then advances
with the machine's timers, i.e. QEMU's ``vm`` behaviour; ``host`` differs from it only when the host's
wall clock is stepped while the VM runs. ``clock=rt`` (a clock that ignores both guest pauses and host
steps in QEMU's own way) is not offered. ``driftfix=slew`` (re-inject lost RTC interrupts) is accepted
with a warning because libvirt writes it by default: pyemu's RTC raises its periodic interrupts on the
machine's timers and does not count lost ones.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Callable

from pyemu.errors import ConfigError

NS_PER_S = 1_000_000_000
_DATE = re.compile(r"^(\d{4})-(\d{2})-(\d{2})(?:T(\d{2}):(\d{2}):(\d{2}))?$")


@dataclass(frozen=True)
class RtcOptions:
    base: str = "utc"
    """``utc``, ``localtime`` or a date as written (validated)."""
    clock: str = "host"
    driftfix: str = "none"

    def __post_init__(self) -> None:
        if self.base not in ("utc", "localtime"):
            parse_date(self.base)
        if self.clock not in ("host", "vm", "rt"):
            raise ConfigError(f"-rtc: invalid option value '{self.clock}'", option="-rtc")
        if self.clock == "rt":
            raise ConfigError("-rtc clock=rt: not supported by pyemu (the RTC follows the machine's clock: "
                              "use clock=host or clock=vm)", option="-rtc")
        if self.driftfix not in ("none", "slew"):
            raise ConfigError(f"-rtc: invalid option value '{self.driftfix}'", option="-rtc")

    def time_source(self, now_ns: Callable[[], int] = time.time_ns) -> Callable[[], int]:
        """The RTC's "host time": nanoseconds since 1970 of the time the RTC should show now.
        A DATE's offset from ``now_ns`` is fixed here, when the board is built."""
        if self.base == "utc":
            return now_ns
        if self.base == "localtime":
            def local_ns() -> int:
                now = now_ns()
                return now + time.localtime(now // NS_PER_S).tm_gmtoff * NS_PER_S
            return local_ns
        offset = parse_date(self.base) * NS_PER_S - now_ns()
        return lambda: now_ns() + offset


def parse_date(text: str) -> int:
    """Seconds since 1970 (UTC) of a ``-rtc base=`` date, with QEMU's error for anything else."""
    match = _DATE.match(text)
    fields = [int(part) for part in match.groups(default="0")] if match else []
    try:
        if not fields or fields[0] < 1900:
            raise ValueError(text)
        stamp = time.strptime(" ".join(str(f) for f in fields), "%Y %m %d %H %M %S")
    except ValueError:
        raise ConfigError("-rtc: invalid datetime format (valid formats: '2006-06-17T16:01:21' or "
                          "'2006-06-17')", option="-rtc") from None
    import calendar  # (only for a date: it brings datetime, ~4 ms of every start otherwise)

    return calendar.timegm(stamp)
