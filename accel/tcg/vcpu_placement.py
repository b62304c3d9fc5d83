"""Where the software vCPUs' host threads run: all on one host CPU, moved when that CPU gets busy.

Why: one engine runs at a time (:mod:`pyemu.accel.tcg.scheduler`), so the vCPU threads of a VM hand the
turn to each other thousands of times per boot. Handing it to a thread asleep on another host CPU costs a
cross-CPU wake-up (on this project's hosts, themselves VMs, ~18 µs for the waker alone, see
:mod:`pyemu.accel.tcg.halt_poll`) and the GIL's hand-off on top; to a thread on the same CPU it costs a
context switch. Measured on a 2-CPU host (2026-12-05, Debian's kernel booted to power-off, runs
interleaved, medians of 5): ``-smp 4`` 4.70 → 4.36 s, ``-smp 8`` 7.93 → 5.95 s, ``-smp 2`` unchanged (3.33
→ 3.37 s, until a PAUSE ended a contended turn at once: block_gate.c); beside ``stress-ng --cpu 2``
``-smp 4`` 6.9 → 6.4 s. The other threads (I/O threads, timers, the main loop) stay free, so device work
runs beside the guest.

A pinned thread is one the kernel's load balancer can no longer move away from a busy CPU, so the group
is reviewed by a thread of its own (:meth:`SharedCpu.review`, every :attr:`SharedCpu.review_s`): when
others kept its CPU busy for more than :attr:`SharedCpu.busy_share` of the period (the CPU's busy time in ``/proc/stat`` less the
group's own run time from ``/proc/<pid>/task/<tid>/schedstat``) and another allowed CPU was idle for at
least as large a share, the group moves there. When every CPU is busy it stays: moving would not help.
(Not the group's run-queue wait: that is mostly its own threads waiting for each other, a vCPU woken by an
interrupt while another runs the engine.)

Only while a thread runs a vCPU (:meth:`SharedCpu.member`) is it pinned; its own affinity comes back after,
so a caller's thread (a test's, an embedding program's) is not left pinned. The group is used when the
vCPUs cannot each have a host CPU anyway (the rule that also turns halt polling off,
:func:`pyemu.accel.tcg.halt_poll.default_max_poll_ns`), and for a VM's only vCPU.

Why the only vCPU: nothing is handed off, but the kernel's scheduler moved the thread between host CPUs as
pyemu's other threads (timers, I/O threads, the console) woke beside it, and each move left the engine's
caches (translated code, its TLB, guest RAM) behind on the other CPU. Measured on a 2-CPU host (2026-12-08,
Debian's kernel PVH-booted to power-off, nine rounds interleaved with QEMU): 2.10 s median unpinned (1.94-
2.31), 1.95 s pinned (1.91-2.00 but one 2.28), pinned faster in 8 of 9 rounds; the whole process on one CPU
(``taskset``) 2.07 s. The reviewer still moves the thread off a CPU that others keep busy.
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator


def thread_run_ns(tid: int) -> int | None:
    """Nanoseconds thread ``tid`` of this process has run on a CPU (None: gone, or no such count)."""
    try:
        with open(f"/proc/self/task/{tid}/schedstat", "rb") as stat:
            return int(stat.read().split()[0])
    except (OSError, IndexError, ValueError):
        return None


@dataclass(frozen=True)
class CpuTicks:
    """Clock ticks of one host CPU since boot (``/proc/stat``): running something, and idle."""

    busy: int
    """user, nice, system, irq and softirq (not steal: time the hypervisor gave away is no one's here)"""
    idle: int
    """idle and I/O wait"""


def cpu_ticks() -> dict[int, CpuTicks]:
    """:class:`CpuTicks` of each host CPU (empty if ``/proc/stat`` cannot be read)."""
    ticks: dict[int, CpuTicks] = {}
    try:
        with open("/proc/stat", "rb") as stat:
            for line in stat:
                if not line.startswith(b"cpu") or line[3:4] == b" ":
                    continue
                fields = [int(field) for field in line.split()[1:8]]
                user, nice, system, idle, iowait, irq, softirq = fields
                ticks[int(line[3:line.index(b" ")])] = CpuTicks(user + nice + system + irq + softirq,
                                                                idle + iowait)
    except (OSError, ValueError):
        return {}
    return ticks


def current_cpu() -> int | None:
    """The host CPU the calling thread last ran on (field 39 of ``/proc/thread-self/stat``)."""
    try:
        with open("/proc/thread-self/stat", "rb") as stat:
            text = stat.read()
        # The command name (field 2) may hold spaces and parentheses: count fields after its last ')'.
        return int(text[text.rindex(b")") + 2:].split()[36])
    except (OSError, IndexError, ValueError):
        return None


CLOCK_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")
"""The unit of ``/proc/stat``."""


@dataclass(frozen=True)
class HostView:
    """How :class:`SharedCpu` reads and steers the host (replaceable in tests)."""

    thread_run_ns: Callable[[int], int | None] = thread_run_ns
    cpu_ticks: Callable[[], dict[int, CpuTicks]] = cpu_ticks
    current_cpu: Callable[[], int | None] = current_cpu
    set_affinity: Callable[[int, set[int]], None] = os.sched_setaffinity
    get_affinity: Callable[[int], set[int]] = os.sched_getaffinity
    monotonic: Callable[[], float] = time.monotonic


class SharedCpu:
    """The host CPU that the vCPU threads of one VM share (see module docstring). Thread-safe."""

    review_s = 0.25
    """How often the group looks at who else used its CPU."""

    busy_share = 0.25
    """Others' use of the group's CPU above this share of a period, with another CPU idle at least as
    long, moves the group."""

    def __init__(self, host: HostView | None = None) -> None:
        self._host = host if host is not None else HostView()
        self._allowed = frozenset(self._host.get_affinity(0))
        self.enabled = False
        """Whether vCPU threads join the group (the accelerator decides by the VM's size)."""
        self.cpu: int | None = None
        """The CPU the group runs on (None until a thread first joins)."""
        self.moves = 0
        self._lock = threading.Lock()
        self._members: dict[int, int] = {}   # native thread id -> how many nested member() calls
        self._closed = threading.Event()
        self._reviewer: threading.Thread | None = None
        self._period_start = 0.0
        self._run_ns: dict[int, int] = {}    # each member's run time when the period (or its stay) began
        self._left_run_ns = 0                # run time this period of members that have left
        self._ticks: dict[int, CpuTicks] = {}

    @property
    def usable(self) -> bool:
        """Enabled, on a process allowed more than one host CPU (one CPU: nothing to gain or move)."""
        return self.enabled and len(self._allowed) > 1

    @contextmanager
    def member(self) -> Iterator[None]:
        """The calling thread runs on the group's CPU for the body, then gets its own affinity back."""
        if not self.usable:
            yield
            return
        tid = threading.get_native_id()
        own = self._join(tid)
        try:
            yield
        finally:
            self._leave(tid, own)

    def review(self) -> None:
        """Move the group if others kept its CPU busy in the period that ends now (the reviewer thread
        calls this every :attr:`review_s`; tests call it directly)."""
        with self._lock:
            if self._members:
                self._review_locked()

    def close(self) -> None:
        """Stop the reviewer thread (the VM ends); members keep their CPU until they leave."""
        self._closed.set()
        reviewer = self._reviewer
        if reviewer is not None and reviewer is not threading.current_thread():
            reviewer.join()

    def _review_loop(self) -> None:
        while not self._closed.wait(self.review_s):
            self.review()

    # -- internals --------------------------------------------------------------------------------------
    def _join(self, tid: int) -> set[int] | None:
        with self._lock:
            depth = self._members.get(tid, 0)
            self._members[tid] = depth + 1
            if depth:
                return None
            own = self._host.get_affinity(0)
            if self.cpu is None:
                here = self._host.current_cpu()
                self.cpu = here if here in self._allowed else min(self._allowed)
            if len(self._members) == 1:
                self._start_period()   # the group was empty (first run, or after a pause): time starts now
            else:
                self._note_run(tid)
            if self._reviewer is None and not self._closed.is_set():
                self._reviewer = threading.Thread(target=self._review_loop, name="vcpu-placement",
                                                  daemon=True)
                self._reviewer.start()
            self._pin(tid, self.cpu)
            return own

    def _leave(self, tid: int, own: set[int] | None) -> None:
        with self._lock:
            depth = self._members[tid] - 1
            if depth:
                self._members[tid] = depth
                return
            del self._members[tid]
            self._left_run_ns += self._ran_ns(tid)
            self._run_ns.pop(tid, None)
        if own is not None:
            try:
                self._host.set_affinity(0, own)
            except OSError:
                pass

    def _pin(self, tid: int, cpu: int) -> None:
        try:
            self._host.set_affinity(tid, {cpu})
        except OSError:
            pass   # the thread ended, or the CPU went offline: the next review picks again

    def _note_run(self, tid: int) -> None:
        run = self._host.thread_run_ns(tid)
        if run is not None:
            self._run_ns[tid] = run

    def _ran_ns(self, tid: int) -> int:
        """How long member ``tid`` ran since the period (or its stay) began."""
        before = self._run_ns.get(tid)
        after = self._host.thread_run_ns(tid)
        return after - before if before is not None and after is not None else 0

    def _start_period(self) -> None:
        self._period_start = self._host.monotonic()
        self._left_run_ns = 0
        self._ticks = self._host.cpu_ticks()
        self._run_ns = {}
        for tid in self._members:
            self._note_run(tid)

    def _review_locked(self) -> None:
        period_s = self._host.monotonic() - self._period_start
        group_s = (self._left_run_ns + sum(self._ran_ns(tid) for tid in self._members)) / 1e9
        before, after = self._ticks, self._host.cpu_ticks()
        self._start_period()
        cpu = self.cpu
        if period_s <= 0 or cpu not in before or cpu not in after:
            return
        others_s = (after[cpu].busy - before[cpu].busy) * CLOCK_TICK_S - group_s
        if others_s <= self.busy_share * period_s:
            return
        idle_s = {other: (after[other].idle - before[other].idle) * CLOCK_TICK_S
                  for other in self._allowed if other != cpu and other in before and other in after}
        if not idle_s:
            return
        target = max(idle_s, key=lambda other: idle_s[other])
        if idle_s[target] < self.busy_share * period_s:
            return   # every CPU is busy: staying costs no more than moving
        self.cpu = target
        self.moves += 1
        for tid in self._members:
            self._pin(tid, target)
