"""Halt polling for the software CPU: how long a halted vCPU spins before it sleeps.

Why: on this project's hosts (themselves virtual machines) waking a thread that sleeps on another CPU
costs the waker ~18 µs inside the wake-up system call, and the sleeper ~20-30 µs more before it runs
(measured with an I/O-thread probe during 4 KiB random reads: ``EventNotifier.set`` 18 µs median, the
vCPU's ``Event.wait`` returning ~35 µs after the interrupt was raised). A guest waiting for a disk or a
network packet halts and is woken by exactly such an interrupt, so every request paid both. A vCPU that
spins (in C, with the GIL released: :meth:`pyemu.accel.tcg.block_gate.BlockGate.poll`) when the interrupt
is near sees it within a microsecond, and the I/O thread that raises it wakes nobody.

Spinning costs a host CPU, so the window adapts as KVM's ``halt_poll_ns`` does
(:class:`pyemu.system.poll_window.PollWindow`, also the I/O threads' window): a halt that ended within the
window keeps it; one that ended after the window but within the maximum doubles it (from a 10 µs start);
one that lasted longer than the maximum (an idle guest waiting for its timer) resets it to 0, so an idle
guest does not spin.

Where it spins: on pyemu's libunicorn at the HLT itself, inside the run (``pyemu_gate_halt`` in
``block_gate.c``), so that an interrupt within the window is taken without the engine returning to the
vCPU's Python loop; between runs (``pyemu_gate_poll``) on PyPI's library, and after a run that ended in a
HLT for another reason. Measured on 2026-12-07 with virtio-blk 1 MiB reads in the Debian guest (the I/O
thread's time stamps): from the end of one host read to the start of the next 354-379 -> 219 µs (median).
"""

from __future__ import annotations

import os

MAX_POLL_NS = 1_000_000
"""Longer waits are idle time, not an I/O completion. Under the software CPU a queue-depth-1 virtio request
keeps the guest halted ~250-450 µs for 4 KiB (the kick's way to the I/O thread, the host I/O, the
interrupt's way back) and ~450-600 µs for 1 MiB. KVM's 200 µs let the vCPU sleep through 53-66% of the 4 KiB
completions (interleaved sessions, 2026-12-06: 400 µs gave 4 KiB random reads +11%, higher in all four
pairs); 400 µs still let every 1 MiB completion find it asleep, so the I/O thread paid a cross-CPU wake-up
(~15-25 µs inside ``Event.set``) and the vCPU ~25-40 µs more before it ran. With 1 ms (host ``perf`` of
the I/O thread's ``preadv``, eight interleaved pairs on 2026-12-07): the time per 1 MiB request outside
the disk read was lower in six, 228 against 296 µs on average over the last four; 4 KiB random reads and
TCP moved within this host's noise (three interleaved pairs each; four more pairs of TCP: medians 440 against
363 MB/s guest → host, 491 against 480 host → guest)."""


def default_max_poll_ns(vcpus: int) -> int:
    """:data:`MAX_POLL_NS` when the host has a CPU for a spinning vCPU beside the running one and the I/O
    thread (one vCPU runs guest code at a time; see :mod:`pyemu.accel.tcg.scheduler`), else 0 (no
    polling): with ``-smp 2`` on two host CPUs a halted vCPU spinning would take the CPU the I/O thread
    or the running vCPU needs. The CPUs counted are those this process may run on (``taskset``, a
    container's cpuset), not all the host has."""
    cpus = len(os.sched_getaffinity(0)) or 1
    return MAX_POLL_NS if cpus >= vcpus + 1 else 0
