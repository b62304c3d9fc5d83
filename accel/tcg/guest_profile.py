"""A guest-level sampling profile: where the guest's instruction pointer is, over wall time.

Why: a host profile (cProfile) of pyemu shows time "inside Unicorn" as one opaque line; comparing with
QEMU needs the *guest's* view -- which kernel functions run, and how much of the wall time the vCPU is
halted waiting for an interrupt (idle) rather than computing. Sampling the guest RIP at a fixed wall-clock
rate and mapping each sample to the kernel's symbols (``/proc/kallsyms`` of a boot at the link address)
gives that view for both emulators with the same symbol table.

Pieces:

* :class:`KernelSymbols` -- a sorted symbol table (``/proc/kallsyms`` text) with address lookup;
* :class:`VcpuSampler` -- a host thread that samples software vCPUs (:class:`~pyemu.accel.tcg.vcpu.TcgVcpu`)
  while they run: the C block gate stores the start of the block running now (``last_block``, one store
  per block once :func:`~pyemu.accel.tcg.block_gate.track_block_starts` asked for it), and the vCPU's
  halted flag says whether it waits in HLT. Both are plain reads from another thread, safe while Unicorn
  runs (no engine call is made). Given the vCPU threads, it also records where each thread is on the host
  (inside the engine, or which pyemu function: the cost of exits and hooks);
* :func:`summarise` -- top functions by share of samples, the idle share, and the share of samples outside
  the kernel (boot code before the kernel proper; user space).
"""

from __future__ import annotations

import bisect
import re
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Callable, Iterable, Sequence

KERNEL_SPACE = 0xFFFF_8000_0000_0000
_KALLSYMS_LINE = re.compile(r"^([0-9a-f]{16}) [tTwW] (\S+)$", re.M)

BEFORE_KERNEL = "[boot code before the kernel proper: setup / decompressor]"
USER_SPACE = "[user space]"
UNKNOWN_KERNEL = "[kernel address without a symbol]"
IDLE = "[idle: vCPU halted in HLT]"


class KernelSymbols:
    """Text symbols of a kernel, looked up by address (the function containing it)."""

    def __init__(self, symbols: Iterable[tuple[int, str]]) -> None:
        pairs = sorted(set(symbols))
        self._addresses = [address for address, _ in pairs]
        self._names = [name for _, name in pairs]

    @classmethod
    def from_kallsyms(cls, text: str) -> "KernelSymbols":
        """Parse ``/proc/kallsyms`` lines (``ffffffff81000000 T startup_64``); only text symbols count."""
        return cls((int(address, 16), name) for address, name in _KALLSYMS_LINE.findall(text))

    def __len__(self) -> int:
        return len(self._addresses)

    def lookup(self, address: int) -> str | None:
        """The symbol at or below ``address`` (None below the first one)."""
        index = bisect.bisect_right(self._addresses, address) - 1
        if index < 0:
            return None
        return self._names[index]


@dataclass(frozen=True)
class Sample:
    """One look at a vCPU: seconds since the start, its RIP (block start), whether it was halted, and
    where its host thread was (:func:`host_location`; empty when not known, e.g. for QEMU)."""

    at: float
    rip: int
    halted: bool
    host: str = ""


ENGINE = "[in Unicorn: translated code and C hooks]"
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


def host_location(frame: FrameType | None) -> str:
    """Where a vCPU thread is, from its innermost Python frame: inside ``emu_start`` (the engine runs
    guest code, with the GIL released), or the innermost pyemu function (a Python hook or exit handler:
    I/O, MMIO, exception delivery, the run loop, waiting in HLT)."""
    if frame is None:
        return ""
    if frame.f_code.co_name == "emu_start":
        return ENGINE
    while frame is not None:
        filename = frame.f_code.co_filename
        if filename.startswith(_PACKAGE_ROOT):
            return f"{filename[len(_PACKAGE_ROOT) + 1:]}:{frame.f_code.co_name}"
        frame = frame.f_back
    return "[outside pyemu]"


@dataclass
class Profile:
    """Samples of one boot, and the sampling rate asked for."""

    hz: float
    samples: list[Sample] = field(default_factory=list)
    wall_s: float = 0.0


def classify(samples: Sequence[Sample], symbols: KernelSymbols) -> list[str]:
    """A bucket name per sample: idle, a kernel function, boot code before the kernel, or user space.

    Low addresses before the first kernel-space sample are the boot code that runs identity-mapped (the
    bzImage's setup and decompressor, PVH's 32-bit entry); after it they are user space (/init)."""
    names: list[str] = []
    seen_kernel = False
    for sample in samples:
        if sample.halted:
            names.append(IDLE)
            continue
        if sample.rip >= KERNEL_SPACE:
            seen_kernel = True
            names.append(symbols.lookup(sample.rip) or UNKNOWN_KERNEL)
        else:
            names.append(USER_SPACE if seen_kernel else BEFORE_KERNEL)
    return names


def sample_weights(profile: Profile) -> list[float]:
    """Each sample stands for the wall time since the one before it (the first: one period).

    Why weights and not counts: a sampler that cannot run on time (pyemu's sampling thread waits for the
    GIL while the vCPU thread runs Python: an exit, a hook) takes its next sample late; counting samples
    would under-weight exactly the Python-heavy stretches, while the delay itself measures them."""
    weights: list[float] = []
    previous = None
    for sample in profile.samples:
        weights.append(1.0 / profile.hz if previous is None else max(sample.at - previous, 0.0))
        previous = sample.at
    return weights


def _weighted(keys: Sequence[str], weights: Sequence[float]) -> dict[str, float]:
    totals: dict[str, float] = {}
    for key, weight in zip(keys, weights):
        totals[key] = totals.get(key, 0.0) + weight
    return totals


def _largest(totals: dict[str, float], top: int) -> list[tuple[str, float]]:
    return sorted(totals.items(), key=lambda item: item[1], reverse=True)[:top]


def bucket_seconds(profile: Profile, symbols: KernelSymbols) -> dict[str, float]:
    """Every bucket's estimated wall seconds (its weighted share of the samples times the sampled wall)."""
    totals = _weighted(classify(profile.samples, symbols), sample_weights(profile))
    total = sum(totals.values()) or 1.0
    return {name: weight / total * profile.wall_s for name, weight in totals.items()}


def summarise(profile: Profile, symbols: KernelSymbols, top: int = 25) -> dict[str, Any]:
    """Top buckets by share of the sampled time (:func:`sample_weights`), with the idle and
    outside-the-kernel shares and their seconds (share x wall time)."""
    names = classify(profile.samples, symbols)
    weights = sample_weights(profile)
    counts = Counter(names)
    totals = _weighted(names, weights)
    total = sum(totals.values()) or 1.0

    def share(weight: float) -> float:
        return round(weight / total, 4)

    rows = [{"function": name, "samples": counts[name], "share": share(weight),
             "seconds": round(weight / total * profile.wall_s, 3)}
            for name, weight in _largest(totals, top)]
    summary: dict[str, Any] = {
        "samples": len(names), "hz": profile.hz, "wall_s": round(profile.wall_s, 3),
        "idle_share": share(totals.get(IDLE, 0.0)),
        "before_kernel_share": share(totals.get(BEFORE_KERNEL, 0.0)),
        "user_share": share(totals.get(USER_SPACE, 0.0)),
        "top": rows,
    }
    if any(sample.host for sample in profile.samples):
        hosts = _weighted([sample.host for sample in profile.samples], weights)
        summary["host_top"] = [{"where": where, "share": share(weight)} for where, weight in _largest(hosts, top)]
    return summary


class VcpuSampler:
    """Samples software vCPUs from a host thread at ``hz`` until stopped.

    ``vcpus`` returns the vCPUs to look at (it may grow while the machine starts). Only vCPU objects with
    the block gate's ``last_block`` are sampled; each sample costs two attribute reads and one read of the
    gate's C struct, done without calling into the engine. With pyemu's libunicorn the engines must be made
    after :func:`pyemu.accel.tcg.block_gate.track_block_starts` (otherwise ``last_block`` only moves when
    the gate runs)."""

    def __init__(self, vcpus: Callable[[], Sequence[Any]], hz: float = 1000.0,
                 threads: Callable[[], dict[int, int]] | None = None) -> None:
        """``threads`` maps a vCPU index to its host thread's ident, to record where that thread is."""
        self._vcpus = vcpus
        self._threads = threads
        self.profile = Profile(hz)
        self.per_vcpu: dict[int, list[Sample]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="guest-profile", daemon=True)
        self._started = 0.0

    def start(self) -> None:
        self._started = time.monotonic()
        self._thread.start()

    def stop(self) -> Profile:
        """Stop sampling; the profile of vCPU 0 (the boot processor) with the wall time sampled."""
        self._stop.set()
        self._thread.join()
        self.profile.wall_s = time.monotonic() - self._started
        self.profile.samples = self.per_vcpu.get(0, [])
        return self.profile

    def _run(self) -> None:
        period = 1.0 / self.profile.hz
        next_at = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            idents = self._threads() if self._threads is not None else {}
            frames = sys._current_frames() if idents else {}
            for vcpu in list(self._vcpus()):
                gate = getattr(vcpu, "_gate", None)
                if gate is None:
                    continue
                index = int(getattr(vcpu, "index", 0))
                ident = idents.get(index)
                host = host_location(frames.get(ident)) if ident is not None else ""
                # A HLT spinning inside the run (BlockGate.poll_halts_in_engine) is as idle as one between runs.
                halted = bool(getattr(vcpu, "_halted", False)) or bool(getattr(gate, "polling_in_engine", False))
                sample = Sample(now - self._started, int(gate.last_block), halted, host)
                self.per_vcpu.setdefault(index, []).append(sample)
            next_at += period
            delay = next_at - time.monotonic()
            if delay < 0:
                next_at = time.monotonic()  # fell behind (GIL): do not burst to catch up
                delay = 0
            self._stop.wait(delay)
