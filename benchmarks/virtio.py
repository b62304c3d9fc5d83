#!/usr/bin/env python3
"""virtio benchmark: block and network throughput measured inside the same Linux guest, pyemu against QEMU 7.2.

Both VMs boot the default guest (Debian 6.1 PVH vmlinux + busybox initramfs, 512 MiB, one vCPU, TCG) with
a second cpio archive appended to the initramfs that holds ``/bin/guest_io``: ``benchmarks/guest_io.c``,
built here with ``gcc -O2 -static`` into a temporary directory (never committed). The guest is driven over
its serial console (stdin/stdout pipes) with marker-delimited shell commands, and in each boot it
measures, ``--reps`` times each (default 3, ``--quick`` 1):

* sequential read and sequential write MB/s (MB = 10^6 bytes) on a virtio-blk raw image (1 GiB, one
  per VM, host ``cache=none``; at ~2 GB/s a pass over the former 256 MiB lasted 0.13 s, short enough for
  one slow moment of the host to decide a sample), ``O_DIRECT`` 1 MiB requests (the write figure includes the final ``fdatasync``), so
  neither the guest page cache nor busybox dd matters. The 1 MiB buffer is one transparent huge page in
  both guests (the benchmark sets THP to ``madvise``, which Linux turns off below 512 MiB of RAM; each
  sample's ``thp_kb`` says whether it got one), so every request is one physically contiguous segment:
  with 4 KiB pages the request's segment count was the guest allocator's luck (255 scattered pages in one
  VM, 1-2 segments in the other on 2026-12-06), and the host reads 255 scattered pieces ~40% slower;
* 4 KiB random read IOPS, ``O_DIRECT``, queue depth 1, fixed xorshift seed, ~5 s.

  The helper times these with ``clock_gettime`` in the guest, but the figures reported are timed with the
  host's clock: the helper prints ``GIO-START`` just before its clock starts and its result line when it
  stops, and the host notes when each line arrives on the console. Reason: these guests have no HPET or PM
  timer, so when the host is busy the clocksource watchdog compares the TSC with late jiffies, marks the
  TSC unstable and switches to ``refined-jiffies``; CLOCK_MONOTONIC then runs slow (measured 0.80x real
  time under pyemu, 0.96x under QEMU, load ~4) and guest-timed figures come out too high. Both are in the
  JSON (``median_by_guest_clock``), with the guest's clocksource and the guest/host clock rate per session;
* TCP throughput guest->host and host->guest over virtio-net on a TAP (64 MiB each way). The TAP lives in
  a network namespace created for the run (one TAP per VM: ``tap0`` 10.0.2.2/24 with the guest at
  10.0.2.15, ``tap1`` 10.0.3.2/24 with 10.0.3.15; no other network is touched) and both VMs run inside
  it; the host end is the same helper run with ``ip netns exec``. The figure is timed on the host side
  (host clock): from the first byte to EOF when the host receives, from accept to the guest's EOF when it
  sends. The guest-side timing is recorded too.

QEMU runs ``-M microvm,acpi=on,pit=on,rtc=on -accel tcg`` with ``tsc_early_khz=<host TSC kHz>`` added to
its kernel command line: without it QEMU 7.2's microvm often hangs under TCG on this shared host while
calibrating the TSC against the PIT (see /work/shared/DESIGN.md, facts of 2026-12-03). pyemu gets the
plain ``console=ttyS0``.

The two VMs take turns sample by sample: a round boots both (one after the other) and keeps them up, and
each repetition of each figure runs in one VM and then in the other (which goes first alternates), while
the other waits idle at its shell prompt. This shared host's disk and CPU speed drift over minutes (QEMU's
sequential read measured 924 and 1620 MB/s in two runs ten minutes apart; pyemu's 918-1451 within one run),
and when each VM measured all its samples in its own boot, whichever met a slow phase carried it alone.
Besides the medians, each figure gets the median of its paired ratios (each pyemu sample over the QEMU
sample taken next to it). ``--rounds N`` boots both N times (each VM from a fresh copy of the image).

Everything is bounded in time: a boot that does not reach the shell, or a console that stops answering,
ends the session; a new session (at most 2 retries, as in boot.py) collects the samples still missing and
the failure is recorded. The host's load average is recorded with every sample (the machine is shared).

Results: a table (pyemu, QEMU, ratio pyemu/QEMU of the medians, median paired ratio) and
``benchmarks/results/virtio.json``.

Usage: python benchmarks/virtio.py [--quick] [--reps 3] [--rounds 1] [--vms pyemu,qemu] [--no-net] [--only FIG,...] [--tsc-khz N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyemu.guest.assets import find_assets
from pyemu.guest.cpio import CpioArchive

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "virtio.json"
HELPER_SOURCE = HERE / "guest_io.c"
GUEST_HELPER = "/bin/guest_io"
MEMORY = "512M"
CMDLINE = "console=ttyS0"
MiB = 1 << 20

IMAGE_MIB = 1024
SEQ_MAX_SECS = 20  # a sequential pass stops after this long even if the image is not done
RAND_SECS = 5
RAND_SEED = 0x9E3779B97F4A7C15
NET_MIB = 64
NET_TIMEOUT = 150  # per transfer; the helpers' alarm() fires at this, the console wait a little later
BOOT_TIMEOUT = 180  # to the shell prompt (pyemu: ~5 s idle; much more when the host is busy)
COMMAND_TIMEOUT = 120  # a console command (disk measurements are bounded well below this)
MAX_RETRIES = 2

GIO_LINE = re.compile(r"GIO op=(\S+) bytes=(\d+) ops=(\d+) secs=([0-9.]+) mbps=([0-9.]+) iops=([0-9.]+)(?: thp_kb=(\d+))?")

# name -> (title, unit, value field of the GIO line)
FIGURES = {
    "seqread": ("sequential read, O_DIRECT 1 MiB", "MB/s", "mbps"),
    "seqwrite": ("sequential write, O_DIRECT 1 MiB + fdatasync", "MB/s", "mbps"),
    "randread": ("4 KiB random read, O_DIRECT, QD1", "IOPS", "iops"),
    "tcp_guest_to_host": ("TCP guest->host, virtio-net + TAP", "MB/s", "mbps"),
    "tcp_host_to_guest": ("TCP host->guest, virtio-net + TAP", "MB/s", "mbps"),
}
DISK_FIGURES = ("seqwrite", "seqread", "randread")
NET_FIGURES = ("tcp_guest_to_host", "tcp_host_to_guest")


class SessionFailed(Exception):
    """The VM did not boot, exited, or its console stopped answering: this boot is over."""


class MeasurementFailed(Exception):
    """One measurement went wrong but the console still works (helper error, host side failed)."""


def load1() -> float:
    return round(os.getloadavg()[0], 2)


# -- host facts -----------------------------------------------------------------------------------------------
def host_tsc_khz() -> tuple[int | None, str]:
    """The host TSC rate in kHz, from the kernel's own log (refined calibration first), else /proc/cpuinfo."""
    try:
        log = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        log = ""
    for pattern, source in ((r"Refined TSC clocksource calibration: ([0-9.]+) MHz", "dmesg refined calibration"),
                            (r"tsc: Detected ([0-9.]+) MHz processor", "dmesg tsc: Detected")):
        found = re.findall(pattern, log)
        if found:
            return round(float(found[-1]) * 1000), source
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return round(float(line.split(":")[1]) * 1000), "/proc/cpuinfo cpu MHz (may not be the TSC rate)"
    except OSError:
        pass
    return None, "unknown"


def host_info(qemu: str | None, tsc_khz: int | None, tsc_source: str) -> dict[str, object]:
    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    qemu_version = ""
    if qemu:
        try:
            qemu_version = subprocess.run([qemu, "--version"], capture_output=True, text=True,
                                          timeout=10).stdout.splitlines()[0]
        except (OSError, subprocess.TimeoutExpired, IndexError):
            pass
    return {"node": platform.node(), "kernel": platform.release(), "cpu_model": cpu_model,
            "cpus": os.cpu_count(), "python": platform.python_version(), "qemu": qemu_version,
            "tsc_khz": tsc_khz, "tsc_khz_source": tsc_source}


# -- guest files ----------------------------------------------------------------------------------------------
def build_helper(workdir: Path) -> Path:
    binary = workdir / "guest_io"
    subprocess.run(["gcc", "-O2", "-static", "-Wall", "-o", str(binary), str(HELPER_SOURCE)], check=True,
                   timeout=120)
    return binary


def build_initrd(base: Path, helper: Path, workdir: Path) -> Path:
    """The default initramfs with a second (gzip) newc archive appended: Linux unpacks concatenated
    archives in turn, so /bin/guest_io is simply added to the same root."""
    extra = CpioArchive()
    extra.add_file(GUEST_HELPER.lstrip("/"), helper.read_bytes(), 0o755)
    initrd = workdir / "initramfs-virtio-bench.cpio.gz"
    data = base.read_bytes()
    initrd.write_bytes(data + b"\0" * (-len(data) % 4) + extra.to_gzip())
    return initrd


def make_image(path: Path, mib: int) -> None:
    """A fully allocated raw image (non-zero data, fsynced), so O_DIRECT reads really reach the host disk."""
    chunk = bytes(range(256)) * (MiB // 256)
    with open(path, "wb") as handle:
        for _ in range(mib):
            handle.write(chunk)
        handle.flush()
        os.fsync(handle.fileno())


# -- network namespace ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NetSlot:
    """One VM's network in the namespace: its TAP, the host's address on it and the guest's, on a /24 of
    its own (VM ``index`` gets tap<index> and 10.0.<2+index>.0/24), so both VMs can be up at once."""

    index: int

    @property
    def tap(self) -> str:
        return f"tap{self.index}"

    @property
    def host_ip(self) -> str:
        return f"10.0.{2 + self.index}.2"

    @property
    def guest_ip(self) -> str:
        return f"10.0.{2 + self.index}.15"


class NetNamespace:
    """``ip netns add`` + a persistent TAP per :class:`NetSlot` inside it, with the host address; deleted in
    :meth:`close` (which also removes the TAPs)."""

    def __init__(self) -> None:
        self.name = f"pyemu-vbench-{os.getpid()}"
        self.created = False

    def _ip(self, *args: str) -> None:
        subprocess.run(["ip", "netns", "exec", self.name, "ip", *args], check=True, capture_output=True,
                       timeout=30)

    def setup(self, slots: int) -> None:
        subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True, timeout=30)
        self.created = True
        self._ip("link", "set", "lo", "up")
        for slot in map(NetSlot, range(slots)):
            self._ip("tuntap", "add", "dev", slot.tap, "mode", "tap")
            self._ip("addr", "add", f"{slot.host_ip}/24", "dev", slot.tap)
            self._ip("link", "set", slot.tap, "up")

    def wrap(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def close(self) -> None:
        if self.created:
            subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=30)
            self.created = False


# -- VM command lines -----------------------------------------------------------------------------------------
def disk_args(image: Path) -> list[str]:
    return ["-drive", f"file={image},format=raw,if=none,id=d0,cache=none",
            "-device", "virtio-blk-device,drive=d0"]


def net_args(slot: NetSlot) -> list[str]:
    return ["-netdev", f"tap,id=n0,ifname={slot.tap},script=no,downscript=no", "-device", "virtio-net-device,netdev=n0"]


def pyemu_argv(kernel: Path, initrd: Path) -> list[str]:
    return [sys.executable, "-m", "pyemu.system.main", "-accel", "tcg", "-m", MEMORY, "-nographic",
            "-kernel", str(kernel), "-initrd", str(initrd), "-append", CMDLINE]


def qemu_argv(qemu: str, kernel: Path, initrd: Path, tsc_khz: int | None) -> list[str]:
    cmdline = CMDLINE + (f" tsc_early_khz={tsc_khz}" if tsc_khz else "")
    return [qemu, "-M", "microvm,acpi=on,pit=on,rtc=on", "-accel", "tcg", "-m", MEMORY, "-nodefaults",
            "-no-user-config", "-nographic", "-serial", "stdio", "-kernel", str(kernel), "-initrd", str(initrd),
            "-append", cmdline]


def pyemu_net_status(netns: NetNamespace | None, kernel: Path, initrd: Path, image: Path) -> str | None:
    """None if pyemu has virtio-net and accepts it on tap0; otherwise why the network part is skipped.

    The probe starts pyemu with its CPUs stopped (``-S``) and the net device: an unknown driver or a TAP
    it cannot open ends the process at once with an error; still running after a few seconds means the
    configuration was accepted."""
    listing = subprocess.run([sys.executable, "-m", "pyemu.system.main", "-device", "help"],
                             capture_output=True, text=True, timeout=60)
    if "virtio-net-device" not in listing.stdout + listing.stderr:
        return "pyemu has no virtio-net-device yet (-device help does not list it)"
    if netns is None:
        return "network namespace unavailable"
    argv = netns.wrap(pyemu_argv(kernel, initrd) + disk_args(image) + net_args(NetSlot(0)) + ["-S"])
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        status = proc.wait(timeout=12)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None
    finally:
        assert proc.stderr is not None
        err = proc.stderr.read().decode(errors="replace").strip()
        proc.stderr.close()
    return f"pyemu refused the virtio-net configuration (exit {status}): {err[-400:]}"


# -- the guest console ----------------------------------------------------------------------------------------
class Console:
    """A VM whose COM1 is its stdin/stdout (pipes); stderr goes to a file."""

    def __init__(self, argv: list[str], stderr_path: Path) -> None:
        self.stderr_path = stderr_path
        self._stderr = open(stderr_path, "wb")
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr)
        self.output = b""
        self.arrivals: list[tuple[int, float]] = []  # (output length after a read, host time of that read)
        self._tag = 7000

    def tail(self, n: int = 1500) -> str:
        err = self.stderr_path.read_bytes()[-600:].decode(errors="replace") if self.stderr_path.exists() else ""
        return self.output[-n:].decode(errors="replace") + (f"\n[stderr]\n{err}" if err.strip() else "")

    def expect(self, needle: bytes, timeout: float, *, after: int = 0) -> None:
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while needle not in self.output[after:]:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SessionFailed(f"no {needle!r} within {timeout:.0f} s")
            ready, _, _ = select.select([fd], [], [], min(remaining, 1.0))
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise SessionFailed(f"VM exited (status {self.proc.wait()}) before {needle!r}")
                self.output += chunk
                self.arrivals.append((len(self.output), time.monotonic()))

    def arrival(self, offset: int) -> float:
        """Host time at which the console byte at ``offset`` was read."""
        for end, when in self.arrivals:
            if end > offset:
                return when
        raise ValueError(offset)

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(text.encode())
            self.proc.stdin.flush()
        except BrokenPipeError as error:
            raise SessionFailed("VM console closed") from error

    def shell(self, command: str, timeout: float = COMMAND_TIMEOUT) -> tuple[int, str]:
        """Run ``command`` at the guest shell (tests/boot/conftest.py's marker scheme: the markers are
        computed by the shell, so the echoed command line never matches them); status and output.
        ``last_span`` is left at the console offsets of the output."""
        self._tag += 2
        tag = self._tag
        start = len(self.output)
        self.send(f"echo \"@@$(({tag}+1))@@\"; {command}; echo \"@@$(({tag}+2))@@rc=$?@@\"\n")
        begin_needle, end_needle = f"@@{tag + 1}@@".encode(), f"@@{tag + 2}@@rc=".encode()
        self.expect(end_needle, timeout, after=start)
        end = self.output.index(end_needle, start)
        self.expect(b"@@", 10, after=end + len(end_needle))
        status = int(self.output[end + len(end_needle):].split(b"@@", 1)[0])
        begin = self.output.index(begin_needle, start) + len(begin_needle)
        self.last_span = (begin, end)
        return status, self.output[begin:end].decode(errors="replace").replace("\r", "").strip("\n")

    def close(self) -> int | None:
        """Power the guest off at once (``poweroff -f``: the benchmark needs no clean shutdown), else kill."""
        status = None
        if self.proc.poll() is None:
            try:
                self.send("poweroff -f\n")
                status = self.proc.wait(timeout=30)
            except (SessionFailed, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        else:
            status = self.proc.returncode
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass
        self._stderr.close()
        return status


def parse_gio(text: str, op: str) -> dict[str, float]:
    for match in GIO_LINE.finditer(text):
        if match.group(1) == op:
            return {"bytes": int(match.group(2)), "ops": int(match.group(3)), "secs": float(match.group(4)),
                    "mbps": float(match.group(5)), "iops": float(match.group(6)),
                    "thp_kb": int(match.group(7) or 0)}
    raise MeasurementFailed(f"no 'GIO op={op}' line in: {text[-400:]!r}")


# -- measurements ---------------------------------------------------------------------------------------------
@dataclass
class Plan:
    reps: int
    image_mib: int
    net_mib: int
    helper: Path
    netns: NetNamespace | None
    net: bool
    slot: NetSlot = NetSlot(0)


def run_helper(vm: Console, args: str, op: str, timeout: float = COMMAND_TIMEOUT) -> dict[str, float]:
    """Run the guest helper; its figures by the guest's clock, plus ``host_secs`` (and ``host_mbps``,
    ``host_iops``): the time between the arrivals of its GIO-START and result lines on the console."""
    status, out = vm.shell(f"GIO_TIMEOUT={int(timeout) - 10} {GUEST_HELPER} {args}", timeout)
    if status != 0:
        raise MeasurementFailed(f"guest_io {args}: exit {status}: {out[-400:]}")
    sample = parse_gio(out, op)
    begin, end = vm.last_span
    first = vm.output.find(b"GIO-START", begin, end)
    last = vm.output.find(f"GIO op={op} ".encode(), begin, end)
    if first >= 0 and last > first:
        secs = vm.arrival(last) - vm.arrival(first)  # first byte of each line: same console latency
        if secs > 0:
            sample["host_secs"] = round(secs, 6)
            sample["host_mbps"] = round(sample["bytes"] / secs / 1e6, 3)
            sample["host_iops"] = round(sample["ops"] / secs, 1)
    return sample


def measure_disk(vm: Console, name: str, plan: Plan) -> dict[str, Any]:
    if name == "seqread":
        sample = run_helper(vm, f"seqread /dev/vda {plan.image_mib} {SEQ_MAX_SECS}", "seqread")
    elif name == "seqwrite":
        sample = run_helper(vm, f"seqwrite /dev/vda {plan.image_mib} {SEQ_MAX_SECS}", "seqwrite")
    else:
        sample = run_helper(vm, f"randread /dev/vda {RAND_SECS} {RAND_SEED}", "randread")
    key = "host_" + FIGURES[name][2]
    if key not in sample:
        raise MeasurementFailed(f"{name}: no GIO-START/result lines to time on the host: {sample}")
    return {"value": sample[key], "guest_clock_value": sample[FIGURES[name][2]], "guest": sample}


def host_helper(plan: Plan, args: list[str]) -> subprocess.Popen[bytes]:
    """The host end of a transfer, in the namespace; returns once it listens."""
    assert plan.netns is not None
    env = dict(os.environ, GIO_TIMEOUT=str(NET_TIMEOUT))
    proc = subprocess.Popen(plan.netns.wrap([str(plan.helper), *args]), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=env)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 15)
    line = proc.stdout.readline().decode(errors="replace") if ready else ""
    if "GIO-LISTENING" not in line:
        proc.kill()
        proc.wait()
        raise MeasurementFailed(f"host helper {args} did not listen: {line!r}")
    return proc


def finish_host(proc: subprocess.Popen[bytes], op: str) -> dict[str, float]:
    try:
        out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise MeasurementFailed(f"host helper {op} did not finish")
    return parse_gio(out.decode(errors="replace"), op)


def measure_net(vm: Console, name: str, plan: Plan, port: int) -> dict[str, Any]:
    if name == "tcp_guest_to_host":
        host = host_helper(plan, ["serve-recv", str(port)])
        guest_args, guest_op, host_op = f"send {plan.slot.host_ip} {port} {plan.net_mib}", "send", "serve-recv"
    else:
        host = host_helper(plan, ["serve-send", str(port), str(plan.net_mib)])
        guest_args, guest_op, host_op = f"recv {plan.slot.host_ip} {port}", "recv", "serve-send"
    try:
        guest = run_helper(vm, guest_args, guest_op, NET_TIMEOUT + 20)
    except BaseException:
        host.kill()
        host.communicate()
        raise
    host_side = finish_host(host, host_op)
    if host_side["bytes"] != plan.net_mib * MiB:
        raise MeasurementFailed(f"{name}: host side moved {host_side['bytes']} bytes, expected {plan.net_mib} MiB")
    return {"value": host_side["mbps"], "guest_clock_value": guest["mbps"], "host": host_side, "guest": guest}


@dataclass
class VmResult:
    samples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    errors: dict[str, list[str]] = field(default_factory=dict)
    disabled: dict[str, str] = field(default_factory=dict)
    sessions: list[dict[str, object]] = field(default_factory=list)


def guest_setup(vm: Console, plan: Plan, info: dict[str, object]) -> bool:
    """Quiet the kernel log on the console, check the disk, bring the network up; True if it works."""
    vm.shell("dmesg -n 1")
    _, info["clocksource"] = vm.shell("cat /sys/devices/system/clocksource/clocksource0/current_clocksource")
    _, unstable = vm.shell("dmesg | grep -c 'Marking TSC unstable'")
    info["tsc_marked_unstable"] = unstable.strip().splitlines()[-1:] != ["0"]
    _, sectors = vm.shell("cat /sys/block/vda/size")
    info["vda_bytes"] = int(sectors.split()[-1]) * 512 if sectors.split() and sectors.split()[-1].isdigit() else None
    _, info["vda_scheduler"] = vm.shell("cat /sys/block/vda/queue/scheduler")
    # Linux turns transparent huge pages off in a guest of under 512 MiB of RAM (ours has just under): allow
    # them for madvise()d memory, so guest_io's 1 MiB buffer is one physically contiguous piece in both VMs.
    vm.shell("echo madvise > /sys/kernel/mm/transparent_hugepage/enabled")
    _, info["transparent_hugepage"] = vm.shell("cat /sys/kernel/mm/transparent_hugepage/enabled")
    if not plan.net:
        return False
    _, ifaces = vm.shell("ls /sys/class/net")
    names = [n for n in ifaces.split() if n != "lo"]
    if not names:
        info["net_error"] = f"no network interface in the guest ({ifaces!r})"
        return False
    nic = names[0]
    host_ip = plan.slot.host_ip
    status, out = vm.shell(f"ip link set lo up; ip addr add {plan.slot.guest_ip}/24 dev {nic} && ip link set {nic} up"
                           f" && for i in 1 2 3 4 5 6 7 8 9 10; do ping -c 1 -W 2 {host_ip} >/dev/null && break;"
                           f" done; ping -c 1 -W 2 {host_ip}", 90)
    info["nic"] = nic
    if status != 0:
        info["net_error"] = f"guest cannot reach {host_ip}: {out[-300:]}"
        return False
    return True


def guest_uptime(vm: Console) -> float:
    _, out = vm.shell("cat /proc/uptime")
    return float(out.split()[0])


@dataclass
class Contender:
    """One VM of a round: its command line and plan, the samples it collected, and its current boot."""

    label: str
    argv: list[str]
    plan: Plan
    result: VmResult
    vm: Console | None = None
    session: dict[str, Any] = field(default_factory=dict)
    clock0: tuple[float, float] = (0.0, 0.0)
    started: float = 0.0
    boots: int = 0


def boot(c: Contender, figures: list[str], workdir: Path) -> bool:
    """Start a session of ``c`` and bring its guest to a configured shell; False (recorded) if it failed."""
    session: dict[str, Any] = {"attempt": len(c.result.sessions) + 1, "load1_start": load1()}
    c.result.sessions.append(session)
    c.session, c.boots, c.started = session, c.boots + 1, time.monotonic()
    vm = Console(c.argv, workdir / f"{file_label(c.label)}-{session['attempt']}.stderr")
    c.vm = vm
    try:
        vm.expect(b"pyemu-guest: init reached", BOOT_TIMEOUT)
        vm.expect(b"# ", 60)
        session["boot_to_shell_s"] = round(time.monotonic() - c.started, 2)
        net_ok = guest_setup(vm, c.plan, session)
        if c.plan.net and not net_ok:
            for f in NET_FIGURES:
                if f in figures and f not in c.result.disabled:
                    c.result.disabled[f] = str(session.get("net_error", "network not configured"))
        c.clock0 = (time.monotonic(), guest_uptime(vm))
        return True
    except SessionFailed as failed:
        end_session(c, failed)
        return False


def file_label(label: str) -> str:
    """A VM's label as part of a file name (``pyemu@DIR`` names a directory)."""
    return label.replace("/", "_")


def end_session(c: Contender, failed: SessionFailed | None = None) -> None:
    """Close ``c``'s boot: the guest clock against the host clock over the measurement when it went well,
    the failure and the console's tail when not."""
    vm, session = c.vm, c.session
    assert vm is not None
    if failed is None:
        try:
            clock_guest1, clock_host1 = guest_uptime(vm), time.monotonic()
            session["guest_clock_rate"] = round((clock_guest1 - c.clock0[1]) / (clock_host1 - c.clock0[0]), 4)
            session["measured_s"] = round(clock_host1 - c.clock0[0], 1)
            _, session["clocksource_end"] = vm.shell(
                "cat /sys/devices/system/clocksource/clocksource0/current_clocksource")
        except SessionFailed as late:
            failed = late
    if failed is not None:
        message = f"session {session['attempt']}: {failed}"
        session["failure"] = message
        session["console_tail"] = vm.tail()
        print(f"  {c.label}: {message} (retrying if attempts remain)\n{vm.tail(800)}", file=sys.stderr)
    session["exit_status"] = vm.close()
    session["load1_end"] = load1()
    session["wall_s"] = round(time.monotonic() - c.started, 1)
    c.vm = None


def wanted(c: Contender, name: str, taken: int, rep: int) -> bool:
    """Whether ``c`` takes a sample of ``name`` in repetition ``rep`` of a round, having ``taken`` this
    round: one a repetition, ``plan.reps`` in all; the repetitions past ``plan.reps`` make up for failures."""
    return name not in c.result.disabled and taken < c.plan.reps and taken <= rep


def measure(c: Contender, name: str, port: int, pair: tuple[int, int]) -> None:
    """One sample of ``name`` in ``c``'s running guest, tagged with its ``pair`` key (round, repetition):
    the other VM's sample with the same key was taken just before or just after it."""
    assert c.vm is not None
    try:
        before = load1()
        sample = measure_net(c.vm, name, c.plan, port) if name in NET_FIGURES else measure_disk(c.vm, name, c.plan)
    except MeasurementFailed as failed:
        c.result.errors[name].append(f"session {c.session['attempt']}: {failed}")
        print(f"  {c.label} {name}: failed: {failed}", file=sys.stderr)
        if len(c.result.errors[name]) >= 2:
            c.result.disabled[name] = f"failed twice: {c.result.errors[name][-1]}"
        return
    sample["load1"] = [before, load1()]
    sample["session"] = c.session["attempt"]
    sample["pair"] = list(pair)
    c.result.samples[name].append(sample)
    print(f"  {c.label:5} {name:18} {sample['value']:10.1f} {FIGURES[name][1]:4}  (load {before})", flush=True)


def run_round(contenders: list[Contender], figures: list[str], workdir: Path, round_index: int = 0) -> None:
    """Boot every VM, then take the samples in turns: each repetition of each figure runs in one VM and
    then in the other (which one goes first alternates by repetition and round), with the VM not measuring
    idle at its shell prompt. So the two samples of a pair are seconds apart, not a whole boot apart: this
    shared host's disk and CPU speed drift over minutes (QEMU's sequential read measured 924 and 1620 MB/s
    in two runs ten minutes apart), and a VM measured in a slow phase would otherwise carry it alone.

    A boot that fails, or a console that stops answering, ends that VM's session; it boots again (at most
    MAX_RETRIES times a round) and goes on with the samples it still lacks."""
    port = 15000
    for c in contenders:
        for name in figures:
            c.result.samples.setdefault(name, [])
            c.result.errors.setdefault(name, [])
        if not c.plan.net:
            for f in NET_FIGURES:
                c.result.disabled.setdefault(f, "network part skipped (see net_skipped)")
        c.boots = 0
    base = {c.label: {name: len(c.result.samples[name]) for name in figures} for c in contenders}

    def ready(c: Contender) -> bool:
        while c.vm is None:
            if c.boots > MAX_RETRIES or boot(c, figures, workdir):
                return c.vm is not None
        return True

    try:
        for c in contenders:
            ready(c)
        for rep in range(contenders[0].plan.reps + MAX_RETRIES):
            order = contenders if (rep + round_index) % 2 == 0 else contenders[::-1]
            for name in figures:
                for c in order:
                    if not wanted(c, name, len(c.result.samples[name]) - base[c.label][name], rep) or not ready(c):
                        continue
                    port += 1
                    try:
                        measure(c, name, port, (round_index, rep))
                    except SessionFailed as failed:
                        end_session(c, failed)
    finally:
        for c in contenders:
            if c.vm is not None:
                end_session(c)


def paired_ratios(results: dict[str, VmResult], name: str) -> list[float]:
    """pyemu / QEMU for each pair of samples of ``name`` taken back to back (same round and repetition)."""
    if "pyemu" not in results or "qemu" not in results:
        return []
    qemu = {tuple(s["pair"]): s["value"] for s in results["qemu"].samples.get(name, []) if "pair" in s}
    return [s["value"] / qemu[tuple(s["pair"])] for s in results["pyemu"].samples.get(name, [])
            if "pair" in s and qemu.get(tuple(s["pair"]))]


def summarise(result: VmResult, figures: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in figures:
        values = [s["value"] for s in result.samples[name]]
        entry: dict[str, Any] = {"unit": FIGURES[name][1], "what": FIGURES[name][0],
                                    "median": round(statistics.median(values), 2) if values else None,
                                    "values": [round(v, 2) for v in values],
                                    "samples": result.samples[name]}
        guest_values = [s["guest_clock_value"] for s in result.samples[name]]
        entry["median_by_guest_clock"] = round(statistics.median(guest_values), 2) if guest_values else None
        if name in NET_FIGURES:
            entry["timed"] = ("host clock, by the host end of the transfer in the namespace (first byte to EOF "
                              "when receiving, accept to the guest's EOF when sending); samples[].guest: the "
                              "guest's own clock_gettime figures")
        else:
            entry["timed"] = ("host clock: between the arrivals of the helper's GIO-START and result lines on "
                              "the serial console (the helper itself times with the guest's clock_gettime: "
                              "samples[].guest, median_by_guest_clock)")
        if result.errors[name]:
            entry["errors"] = result.errors[name]
        if name in result.disabled:
            entry["skipped"] = result.disabled[name]
        out[name] = entry
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3, help="repetitions of each measurement in one boot")
    parser.add_argument("--rounds", type=int, default=1,
                        help="boot every VM this many times, alternating their order (medians over all samples)")
    parser.add_argument("--quick", action="store_true", help="one repetition of each")
    parser.add_argument("--vms", default="pyemu,qemu",
                        help="comma-separated: pyemu, qemu, or pyemu@DIR (pyemu from the tree DIR/pyemu, e.g. a "
                             "`git archive` of another commit, for an A/B of two builds)")
    parser.add_argument("--no-net", action="store_true", help="skip the virtio-net part")
    parser.add_argument("--only", default="", help=f"comma-separated figures to measure (of {', '.join(FIGURES)}); "
                                                   "default all (the JSON then holds only these)")
    parser.add_argument("--image-mib", type=int, default=IMAGE_MIB)
    parser.add_argument("--net-mib", type=int, default=NET_MIB)
    parser.add_argument("--tsc-khz", type=int, help="host TSC kHz for QEMU's tsc_early_khz (default: from dmesg)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    reps = 1 if args.quick else args.reps
    only = [f for f in args.only.split(",") if f]
    unknown = [f for f in only if f not in FIGURES]
    if unknown:
        parser.error(f"--only: unknown figure(s) {', '.join(unknown)} (known: {', '.join(FIGURES)})")
    if only and not set(only) & set(NET_FIGURES):
        args.no_net = True
    assets = find_assets()
    if assets is None:
        print("guest assets missing: run 'pyemu-guest fetch'", file=sys.stderr)
        return 2
    if shutil.which("gcc") is None:
        print("gcc is needed to build the guest helper", file=sys.stderr)
        return 2
    qemu = shutil.which("qemu-system-x86_64")
    vms = [v for v in args.vms.split(",") if v]
    if "qemu" in vms and qemu is None:
        print("qemu-system-x86_64 not installed: QEMU column skipped", file=sys.stderr)
        vms.remove("qemu")
    tsc_khz, tsc_source = (args.tsc_khz, "--tsc-khz") if args.tsc_khz else host_tsc_khz()

    report: dict[str, Any] = {
        "benchmark": "virtio-blk and virtio-net throughput inside the Debian 6.1 guest, pyemu TCG vs QEMU 7.2 TCG",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "host": host_info(qemu, tsc_khz, tsc_source),
        "load_avg_start": [round(x, 2) for x in os.getloadavg()],
        "settings": {"reps": reps, "rounds": args.rounds, "memory": MEMORY, "vcpus": 1, "image_mib": args.image_mib,
                     "seq_block": "1 MiB", "seq_max_secs": SEQ_MAX_SECS, "rand_block": "4 KiB",
                     "rand_secs": RAND_SECS, "rand_seed": RAND_SEED, "net_mib": args.net_mib,
                     "drive": "format=raw,if=none,cache=none + virtio-blk-device",
                     "units": "MB = 10^6 bytes"},
        "notes": [
            f"QEMU's kernel command line carries tsc_early_khz={tsc_khz} (host TSC, {tsc_source}): without it "
            "QEMU 7.2 microvm under TCG often hangs calibrating the TSC against the PIT on this shared host "
            "(DESIGN.md, facts of 2026-12-03). pyemu boots with plain console=ttyS0.",
            "Shared 2-core host: other jobs may run at the same time; see load1 per sample and per session.",
        ],
    }
    print(f"QEMU gets tsc_early_khz={tsc_khz} ({tsc_source}) on its kernel command line "
          "(QEMU 7.2 microvm TCG hangs calibrating the TSC otherwise on this host)")

    workdir = Path(tempfile.mkdtemp(prefix="pyemu-virtio-bench-", dir="/var/tmp"))
    netns: NetNamespace | None = None
    vm_reports: dict[str, dict[str, Any]] = {}
    try:
        helper = build_helper(workdir)
        initrd = build_initrd(assets.initrd, helper, workdir)
        net_skip: str | None = "--no-net" if args.no_net else None
        if net_skip is None:
            if os.geteuid() != 0 or shutil.which("ip") is None:
                net_skip = "needs root and iproute2 for the network namespace"
            else:
                netns = NetNamespace()
                try:
                    netns.setup(len(vms))
                except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
                    net_skip = f"could not set up the network namespace: {error}"
                    netns.close()
                    netns = None
        # Per VM: QEMU still measures the network when pyemu cannot (its figures are then ready to compare).
        skipped = {label: net_skip for label in vms}
        if net_skip is None and "pyemu" in vms:
            probe_image = workdir / "probe.img"
            make_image(probe_image, 1)
            skipped["pyemu"] = pyemu_net_status(netns, assets.vmlinux, initrd, probe_image)
        report["net_skipped"] = skipped
        for label, reason in skipped.items():
            if reason:
                print(f"{label}: network part skipped: {reason}")
        figures = [f for f in (*DISK_FIGURES, *NET_FIGURES) if not only or f in only]
        results = {label: VmResult() for label in vms}
        argvs: dict[str, list[str]] = {}
        for round_index in range(args.rounds):
            contenders = []
            for index, label in enumerate(vms):
                plan = Plan(reps=reps, image_mib=args.image_mib, net_mib=args.net_mib, helper=helper,
                            netns=netns, net=skipped[label] is None, slot=NetSlot(index))
                image = workdir / f"disk-{file_label(label)}.img"
                make_image(image, args.image_mib)  # each VM starts every round from the same image
                if label.startswith("pyemu@"):  # another pyemu tree, for an A/B of two builds
                    argv = ["env", f"PYTHONPATH={label[len('pyemu@'):]}", *pyemu_argv(assets.vmlinux, initrd)]
                else:
                    argv = (pyemu_argv(assets.vmlinux, initrd) if label == "pyemu"
                            else qemu_argv(qemu, assets.vmlinux, initrd, tsc_khz))  # type: ignore[arg-type]
                argv += disk_args(image) + (net_args(plan.slot) if plan.net else [])
                if plan.net and netns is not None:
                    argv = netns.wrap(argv)
                print(f"{label} (round {round_index + 1} of {args.rounds}): {' '.join(argv)}", flush=True)
                argvs[label] = argv
                contenders.append(Contender(label, argv, plan, results[label]))
            run_round(contenders, figures, workdir, round_index)
        for label, result in results.items():
            vm_reports[label] = {"argv": argvs[label], "sessions": result.sessions,
                                 "figures": summarise(result, figures)}
            if all(not result.samples[f] for f in figures):
                vm_reports[label]["failed"] = "no sample: every session failed"
    finally:
        if netns is not None:
            netns.close()
        shutil.rmtree(workdir, ignore_errors=True)

    report["vms"] = vm_reports
    report["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    comparison: dict[str, object] = {}
    print()
    print(f"{'figure (host clock; in brackets: by the guest clock)':52} {'pyemu':>18} {'QEMU 7.2':>18} "
          f"{'pyemu/QEMU':>11} {'paired':>7}")

    def cell(v: float | None, g: float | None) -> str:
        return f"{v:>9.1f} [{g:>6.1f}]" if v is not None and g is not None else f"{'-':>18}"

    for name, (title, unit, _) in FIGURES.items():
        medians, by_guest = {}, {}
        for label in ("pyemu", "qemu"):
            figs = vm_reports.get(label, {}).get("figures", {})
            medians[label] = figs.get(name, {}).get("median")
            by_guest[label] = figs.get(name, {}).get("median_by_guest_clock")
        ratio = (round(medians["pyemu"] / medians["qemu"], 3)
                 if medians["pyemu"] is not None and medians["qemu"] else None)
        pairs = paired_ratios(results, name)
        paired = round(statistics.median(pairs), 3) if pairs else None
        comparison[name] = {"unit": unit, "pyemu": medians["pyemu"], "qemu": medians["qemu"],
                            "ratio_pyemu_over_qemu": ratio, "paired_ratio_median": paired,
                            "paired_ratios": [round(r, 3) for r in pairs],
                            "pyemu_by_guest_clock": by_guest["pyemu"],
                            "qemu_by_guest_clock": by_guest["qemu"]}
        print(f"{title + ' (' + unit + ')':52} {cell(medians['pyemu'], by_guest['pyemu'])} "
              f"{cell(medians['qemu'], by_guest['qemu'])} {(f'{ratio:.3f}' if ratio is not None else '-'):>11} "
              f"{(f'{paired:.3f}' if paired is not None else '-'):>7}")
    for label, vm_report in vm_reports.items():
        for session in vm_report.get("sessions", []):
            print(f"{label} session {session.get('attempt')}: guest clocksource {session.get('clocksource')} -> "
                  f"{session.get('clocksource_end')}, guest clock / host clock {session.get('guest_clock_rate')}, "
                  f"load {session.get('load1_start')} -> {session.get('load1_end')}"
                  + (f", FAILED: {session['failure']}" if "failure" in session else ""))
    report["comparison"] = comparison
    for label, reason in (report.get("net_skipped") or {}).items():
        if reason:
            print(f"{label}: network part skipped: {reason}")
    print(f"(medians of {reps * args.rounds}; QEMU booted with tsc_early_khz={tsc_khz}; load average now "
          f"{report['load_avg_end']})")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the namespace is deleted on SIGTERM too
    sys.exit(main())
