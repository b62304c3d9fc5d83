#!/usr/bin/env python3
"""Guest-level boot profile: sample the guest RIP during a boot under pyemu and under QEMU 7.2 TCG, map
the samples to the kernel's symbols, and print the top guest functions and the idle share of each.

Used by ``benchmarks/boot.py --guest-profile`` (results in ``benchmarks/results/boot_guest_profile.json``);
runnable alone for one image: ``python benchmarks/guest_profile.py --image pvh``.

How each emulator is sampled:

* pyemu: the boot runs in a child Python process (``--pyemu-child``) with a sampling thread
  (:class:`pyemu.accel.tcg.guest_profile.VcpuSampler`) reading the block gate's current block start and
  the vCPU's halted flag at ``--hz`` (1 kHz); no engine call is made from the sampling thread.
* QEMU: through its gdbstub (``-gdb tcp:...``): every sample interrupts the VM (Ctrl-C), reads RIP
  (register 16), reads the byte before RIP to see whether the vCPU sits after a HLT (idle), and continues.
  The stop is exact (RIP at an instruction boundary); it costs wall time, so QEMU is sampled at a lower
  rate (``--qemu-hz``, 250 Hz) and its sampled boot is slower than an unsampled one -- the *shares* are
  what compare. HMP ``info registers`` would not stop the VM but reads a stale RIP under TCG (chained
  translation blocks do not store it).

Symbols: Debian's System.map is a placeholder, so the table is ``/proc/kallsyms`` read from the guest
itself: one QEMU boot of the bzImage with ``nokaslr`` (addresses = link addresses), whose shell prints the
text symbols; cached in pyemu's cache keyed by the kernel's SHA-256. The PVH vmlinux and pyemu's
host-decompressed bzImage run at the link address; a bzImage run by its own decompressor is randomised
(KASLR), so bzImage profiles add ``nokaslr`` to the command line (said in the results).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from host_memory import warm_free_memory  # benchmarks/host_memory.py, beside this script
from pyemu.accel.tcg.guest_profile import KernelSymbols, Profile, Sample, VcpuSampler, bucket_seconds, summarise
from pyemu.system.cache import cache_root

MEMORY = "512M"
KALLSYMS_BEGIN = b"KSYMS-BEGIN"
KALLSYMS_END = b"KSYMS-END"
MARKER = b"pyemu-guest: init reached"
POWER_DOWN = b"reboot: Power down"
TIMEOUT = 60.0
HLT = 0xF4
RIP_OFFSET = 16 * 8  # bytes before RIP in the gdbstub's x86-64 register block


class ProfileError(Exception):
    """A profiled boot did not complete (no power-off, no symbols)."""


# -- symbols -----------------------------------------------------------------------------------------------
def kallsyms(qemu: str, kernel: Path, initrd: Path) -> KernelSymbols:
    """The kernel's text symbols at its link address (cached per kernel digest)."""
    digest = hashlib.sha256(kernel.read_bytes()).hexdigest()
    cached = cache_root() / "kernels" / f"{digest}.kallsyms"
    if not cached.is_file():
        # QEMU TCG on a busy host sometimes fails to calibrate the TSC against the PIT and never gets a
        # working timer (see benchmarks/boot.py): such a boot is retried.
        for attempt in range(3):
            try:
                text = _read_kallsyms(qemu, kernel, initrd)
                break
            except ProfileError as failed:
                if attempt == 2:
                    raise
                print(f"  symbol-listing boot failed, retrying: {str(failed).splitlines()[0]}", file=sys.stderr)
        cached.parent.mkdir(parents=True, exist_ok=True)
        scratch = cached.with_suffix(".partial")
        scratch.write_text(text)
        os.replace(scratch, cached)
    symbols = KernelSymbols.from_kallsyms(cached.read_text())
    if len(symbols) < 1000:
        raise ProfileError(f"only {len(symbols)} symbols in {cached}: delete it and run again")
    return symbols


def _read_kallsyms(qemu: str, kernel: Path, initrd: Path) -> str:
    # tsc_early_khz: a busy host must not fail this boot's PIT calibration (tests/boot/boot_helpers.py)
    argv = [qemu, "-machine", "microvm,acpi=on", "-accel", "tcg", "-m", MEMORY, "-kernel", str(kernel),
            "-initrd", str(initrd), "-append", "console=ttyS0 nokaslr tsc_early_khz=2000000", "-nographic", "-no-reboot",
            "-nodefaults", "-serial", "stdio"]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdin is not None and proc.stdout is not None
    output = b""
    sent = False
    deadline = time.monotonic() + TIMEOUT
    try:
        while KALLSYMS_END + b"\r\n" not in output and KALLSYMS_END + b"\n" not in output:
            if time.monotonic() > deadline:
                tail = output[-800:].decode(errors="replace")
                raise ProfileError(f"the symbol-listing boot did not finish in time; console tail:\n{tail}")
            ready, _, _ = select.select([proc.stdout], [], [], 0.5)
            if ready:
                chunk = os.read(proc.stdout.fileno(), 1 << 20)
                if not chunk:
                    break
                output += chunk
            if not sent and MARKER in output and b"# " in output[output.find(MARKER):]:  # the shell prompt
                # The quotes keep the echoed command line from matching the markers.
                proc.stdin.write(b"echo KSYMS-BEG''IN; grep '^[0-9a-f]* [tT] ' /proc/kallsyms; "
                                 b"echo KSYMS-E''ND; poweroff -f\n")
                proc.stdin.flush()
                sent = True
    finally:
        proc.kill()
        proc.wait()
    start = output.rfind(KALLSYMS_BEGIN)
    end = output.rfind(KALLSYMS_END)
    if start < 0 or end < start:
        raise ProfileError("the guest did not list /proc/kallsyms")
    return output[start:end].decode(errors="replace").replace("\r", "")


# -- QEMU through its gdbstub --------------------------------------------------------------------------------
class GdbRemote:
    """The few GDB remote-protocol packets the sampler needs. The VM is stopped once connected (QEMU stops
    it when a debugger attaches): :meth:`resume` it."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
                # Small packets both ways: without this, Nagle and delayed ACKs add ~40 ms per exchange.
                self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        self._buffer = b""
        # QEMU stops the VM when a debugger attaches and says so with a stop reply; 7.2 has no no-ack mode.
        self.stop_reply = self._receive()

    @staticmethod
    def frame(payload: str) -> bytes:
        """``$payload#checksum`` (the modulo-256 sum of the payload bytes, two hex digits)."""
        data = payload.encode()
        return b"$" + data + b"#" + f"{sum(data) & 0xFF:02x}".encode()

    @staticmethod
    def parse(buffer: bytes) -> tuple[str | None, bytes]:
        """The first complete packet's payload in ``buffer`` and what follows it (acks skipped)."""
        start = buffer.find(b"$")
        if start < 0:
            return None, b"" if not buffer.strip(b"+-") else buffer
        end = buffer.find(b"#", start)
        if end < 0 or len(buffer) < end + 3:
            return None, buffer[start:]
        return buffer[start + 1:end].decode(errors="replace"), buffer[end + 3:]

    def _receive(self) -> str:
        while True:
            payload, self._buffer = self.parse(self._buffer)
            if payload is not None:
                self._sock.sendall(b"+")
                return payload
            chunk = self._sock.recv(65536)
            if not chunk:
                raise ConnectionError("the gdbstub closed the connection")
            self._buffer += chunk

    def command(self, payload: str) -> str:
        self._sock.sendall(self.frame(payload))
        return self._receive()

    def interrupt(self) -> str:
        """Stop the VM (Ctrl-C); the stop reply."""
        self._sock.sendall(b"\x03")
        return self._receive()

    def resume(self) -> None:
        self._sock.sendall(self.frame("c"))

    def read_rip(self) -> int:
        """RIP from the ``g`` packet (QEMU 7.2 answers ``p`` only after an XML target description): the
        x86-64 layout has 16 eight-byte GPRs, then RIP."""
        reply = self.command("g")
        if len(reply) < 2 * RIP_OFFSET + 16:
            raise ConnectionError(f"short register reply from the gdbstub ({len(reply)} hex digits)")
        return int.from_bytes(bytes.fromhex(reply[2 * RIP_OFFSET:2 * RIP_OFFSET + 16]), "little")

    def read_byte(self, address: int) -> int | None:
        reply = self.command(f"m{address:x},1")
        if len(reply) != 2 or reply.startswith("E"):
            return None
        return int(reply, 16)

    def close(self) -> None:
        self._sock.close()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def qemu_profile(qemu: str, kernel: Path, initrd: Path, cmdline: str, hz: float) -> Profile:
    """One QEMU TCG boot sampled through the gdbstub; its wall time excludes the pauses for the samples."""
    port = _free_port()
    log = tempfile.NamedTemporaryFile(prefix="qemu-profile-", suffix=".log", delete=False)
    argv = [qemu, "-machine", "microvm,acpi=on", "-accel", "tcg", "-m", MEMORY, "-kernel", str(kernel),
            "-initrd", str(initrd), "-append", cmdline, "-nographic", "-no-reboot", "-nodefaults",
            "-serial", f"file:{log.name}", "-gdb", f"tcp:127.0.0.1:{port}"]
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    profile = Profile(hz)
    period = 1.0 / hz
    paused = 0.0
    try:
        gdb = GdbRemote(port)
        gdb.resume()
        console = open(log.name, "rb")
        try:
            time.sleep(period)
            while proc.poll() is None and time.monotonic() - started < TIMEOUT:
                stopped_at = time.monotonic()
                gdb.interrupt()
                rip = gdb.read_rip()
                before = gdb.read_byte(rip - 1) if rip else None
                profile.samples.append(Sample(stopped_at - started, rip, before == HLT))
                gdb.resume()
                paused += time.monotonic() - stopped_at
                time.sleep(period)
                console.seek(max(0, os.fstat(console.fileno()).st_size - 200))
                if POWER_DOWN in console.read():
                    break
        except (ConnectionError, OSError):
            pass  # QEMU exited (power-off)
        finally:
            gdb.close()
            console.close()
    finally:
        # The time the VM stood still for the samples is not the guest's: the wall the shares divide is
        # the running time.
        profile.wall_s = time.monotonic() - started - paused
        proc.kill()
        proc.wait()
        output = Path(log.name).read_bytes()
        os.unlink(log.name)
    if MARKER not in output:
        tail = output[-600:].decode(errors="replace")
        raise ProfileError(f"the sampled QEMU boot did not reach /init ({len(profile.samples)} samples); "
                           f"console tail:\n{tail}")
    return profile


# -- pyemu in a child process ------------------------------------------------------------------------------
def pyemu_profile(kernel: Path, initrd: Path, cmdline: str, hz: float,
                  env: dict[str, str] | None = None) -> tuple[Profile, dict[str, float]]:
    """One pyemu TCG boot sampled in a child process (``env`` added to its environment); the profile and
    host-side timings (interpreter start and imports, machine set-up, vCPU run)."""
    with tempfile.TemporaryDirectory(prefix="pyemu-profile-") as scratch:
        out = Path(scratch) / "samples.json"
        started = time.monotonic()
        subprocess.run([sys.executable, __file__, "--pyemu-child", str(kernel), str(initrd), cmdline, str(hz),
                        str(out)], check=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL,
                       env=None if env is None else {**os.environ, **env})
        process_wall = time.monotonic() - started
        data = json.loads(out.read_text())
    profile = Profile(data["hz"], [Sample(*s) for s in data["samples"]], data["wall_s"])
    timings = {"process_wall_s": round(process_wall, 3), "before_main_s": data["before_main_s"],
               "main_to_vcpu_start_s": data["main_to_vcpu_start_s"], "vcpu_to_exit_s": round(data["wall_s"], 3)}
    return profile, timings


def _pyemu_child(kernel: str, initrd: str, cmdline: str, hz: float, out: str, process_start: float) -> int:
    from pyemu.accel.tcg.block_gate import track_block_starts
    from pyemu.machines.base import Machine
    from pyemu.system.main import main

    track_block_starts(True)  # the sampler reads each vCPU's last_block

    vcpus: list[Any] = []
    threads: dict[int, int] = {}
    sampler = VcpuSampler(lambda: vcpus, hz, lambda: threads)
    original = Machine._vcpu_loop
    marks: dict[str, float] = {}

    def sampled_vcpu_loop(self: Machine, index: int, vcpu: Any) -> None:
        threads[index] = threading.get_ident()
        vcpus.append(vcpu)
        if index == 0:
            marks["vcpu_start"] = time.monotonic()
            sampler.start()
        original(self, index, vcpu)

    Machine._vcpu_loop = sampled_vcpu_loop  # type: ignore[method-assign]
    # The sampler needs the GIL to look; while the vCPU thread runs Python it gets it only at the switch
    # interval (5 ms by default): a short one keeps samples on time (late ones are weighted, see
    # pyemu.accel.tcg.guest_profile.sample_weights).
    sys.setswitchinterval(0.0002)
    serial = Path(out).with_suffix(".serial")
    marks["main"] = time.monotonic()
    main(["-machine", "microvm", "-accel", "tcg", "-m", MEMORY, "-kernel", kernel, "-initrd", initrd,
          "-append", cmdline, "-display", "none", "-serial", f"file:{serial}", "-no-reboot"])
    profile = sampler.stop()
    if MARKER not in serial.read_bytes():
        raise ProfileError("the sampled pyemu boot did not reach /init")
    Path(out).write_text(json.dumps({
        "hz": hz, "wall_s": profile.wall_s, "samples": [[s.at, s.rip, s.halted, s.host] for s in profile.samples],
        "before_main_s": round(marks["main"] - process_start, 3),
        "main_to_vcpu_start_s": round(marks["vcpu_start"] - marks["main"], 3),
    }))
    return 0


# -- both, for one image -----------------------------------------------------------------------------------
def profile_image(image: str, kernel: Path, initrd: Path, cmdline: str, *, qemu: str | None, hz: float,
                  qemu_hz: float, symbols: KernelSymbols, top: int = 20,
                  tsc_early_khz: int | None = None, pyemu_env: dict[str, str] | None = None,
                  with_qemu: bool = True) -> dict[str, Any]:
    """Profiles of one image under both emulators, summarised with the same symbol table.

    ``tsc_early_khz`` goes on both command lines when given: QEMU TCG's PIT calibration of the TSC fails
    on a busy host and its boot then never finishes; pyemu states the TSC rate in CPUID, so the option
    changes nothing there but the source of the same figure."""
    if image == "bzimage" and "nokaslr" not in cmdline.split():
        cmdline += " nokaslr"  # QEMU's decompressor would randomise the addresses the symbols name
    if tsc_early_khz:
        cmdline += f" tsc_early_khz={tsc_early_khz}"
    result: dict[str, Any] = {"cmdline": cmdline}
    if pyemu_env:
        result["pyemu_environment"] = pyemu_env
    warm_free_memory()  # both boots on memory the hypervisor backs already (host_memory.py)
    profile, timings = pyemu_profile(kernel, initrd, cmdline, hz, pyemu_env)
    result["pyemu_tcg"] = summarise(profile, symbols, top) | {"host_timings": timings}
    if qemu and with_qemu:
        warm_free_memory()
        reference = qemu_profile(qemu, kernel, initrd, cmdline, qemu_hz)
        result["qemu_tcg"] = summarise(reference, symbols, top)
        result["slower_under_pyemu"] = compare(bucket_seconds(profile, symbols), bucket_seconds(reference, symbols))
    return result


def compare(mine: dict[str, float], theirs: dict[str, float], top: int = 15) -> list[dict[str, Any]]:
    """Buckets by extra seconds under pyemu (``mine``) over QEMU (``theirs``), largest first."""
    extra = {name: round(mine.get(name, 0.0) - theirs.get(name, 0.0), 3) for name in set(mine) | set(theirs)}
    rows: list[dict[str, Any]] = [
        {"function": name, "pyemu_s": round(mine.get(name, 0.0), 3), "qemu_s": round(theirs.get(name, 0.0), 3),
         "extra_s": extra[name]}
        for name in sorted(extra, key=lambda name: extra[name], reverse=True)]
    return rows[:top]


def tsc_khz(option: int | None) -> int | None:
    """``--tsc-early-khz``: None (not given), the host's TSC rate for 0, else the value."""
    if option is None:
        return None
    if option:
        return option
    from pyemu.accel.tcg.tsc import host_tsc_hz

    return host_tsc_hz() // 1000


def print_profile(name: str, result: dict[str, Any], rows: int = 12) -> None:
    for who in ("pyemu_tcg", "qemu_tcg"):
        summary = result.get(who)
        if summary is None:
            continue
        print(f"{name} {who}: {summary['samples']} samples over {summary['wall_s']} s, idle "
              f"{summary['idle_share'] * 100:.1f}%, before kernel {summary['before_kernel_share'] * 100:.1f}%, "
              f"user {summary['user_share'] * 100:.1f}%")
        for row in summary["top"][:rows]:
            print(f"    {row['share'] * 100:5.1f}%  {row['seconds']:6.2f} s  {row['function']}")
        if "host_top" in summary:
            print(f"  {who} host thread of vCPU 0:")
            for row in summary["host_top"][:8]:
                print(f"    {row['share'] * 100:5.1f}%  {row['where']}")
    if "slower_under_pyemu" in result:
        print(f"{name}: most extra time under pyemu (s):")
        for row in result["slower_under_pyemu"][:10]:
            print(f"    +{row['extra_s']:6.2f} s  (pyemu {row['pyemu_s']:.2f}, qemu {row['qemu_s']:.2f})  {row['function']}")


def main() -> int:
    process_start = time.monotonic()
    if len(sys.argv) == 7 and sys.argv[1] == "--pyemu-child":
        _, _, kernel, initrd, cmdline, hz, out = sys.argv
        return _pyemu_child(kernel, initrd, cmdline, float(hz), out, process_start)
    from pyemu.guest.assets import find_assets

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default="pvh", choices=["pvh", "bzimage"])
    parser.add_argument("--cmdline", default="console=ttyS0 pyemu.poweroff=1")
    parser.add_argument("--hz", type=float, default=1000.0)
    parser.add_argument("--qemu-hz", type=float, default=250.0)
    parser.add_argument("--tsc-early-khz", type=int, default=None,
                        help="add tsc_early_khz=N to both command lines (0: the host's TSC rate)")
    args = parser.parse_args()
    assets = find_assets()
    qemu = shutil.which("qemu-system-x86_64")
    if assets is None or qemu is None:
        print("needs the guest assets ('pyemu-guest fetch') and qemu-system-x86_64", file=sys.stderr)
        return 2
    symbols = kallsyms(qemu, assets.kernel, assets.initrd)
    result = profile_image(args.image, assets.kernel if args.image == "bzimage" else assets.vmlinux, assets.initrd, args.cmdline, qemu=qemu, hz=args.hz,
                           qemu_hz=args.qemu_hz, symbols=symbols, tsc_early_khz=tsc_khz(args.tsc_early_khz))
    print_profile(args.image, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
