"""``-smp 2`` on the microvm board, under both accelerators.

Small multiboot kernels (:mod:`pyemu.testing.smp_kernels`) check the machinery one piece at a time: the
boot processor starts the second vCPU with INIT/SIPI through its local APIC (userspace under TCG,
in-kernel under KVM) and the application processor runs; under TCG, both CPUs hammer shared counters
(``lock inc`` and an ``xchg`` spinlock with PAUSE) and must lose no update; and a function the AP has run
is rewritten by the BSP, after which the AP must run the new code (cross-modifying code between
engines). Then Debian's kernel boots with two CPUs: to the shell under TCG, through MADT parsing under
KVM (this host's KVM goes no further, DESIGN.md).

Every kernel is bounded twice: the BSP gives up after a fixed number of polls (its own exit status), and
the process has a wall-clock timeout.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time

import pytest

from pyemu.testing import smp_kernels

BOOT_TIMEOUT = 240


def run_kernel(tmp_path, image: bytes, accel: str, timeout: float = 90) -> subprocess.CompletedProcess:
    path = tmp_path / "smp-kernel.bin"
    path.write_bytes(image)
    return subprocess.run(
        [sys.executable, "-m", "pyemu.system.main", "-machine", "microvm", "-accel", accel, "-smp", "2",
         "-m", "64M", "-kernel", str(path), "-nographic",
         "-device", f"isa-debug-exit,iobase={smp_kernels.EXIT_PORT:#x},iosize=4"],
        stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout,
    )


def shared_memory_machine(tmp_path):
    """The shared-counter kernel on a two-vCPU TCG board built in this process (not started)."""
    from pyemu.machines.microvm import Microvm
    from pyemu.system.options import parse_args
    from pyemu.system.instance import choose_accelerator, resolve_boot

    image = tmp_path / "shared.bin"
    image.write_bytes(smp_kernels.shared_memory_kernel(200_000))
    config = parse_args(["-M", "microvm", "-accel", "tcg", "-smp", "2", "-m", "64M", "-kernel", str(image),
                         "-serial", "null", "-device",
                         f"isa-debug-exit,iobase={smp_kernels.EXIT_PORT:#x},iosize=4"])
    return Microvm.create(config, choose_accelerator(config.accel), resolve_boot(config))


@pytest.mark.parametrize("accel", ["tcg", pytest.param("kvm", marks=pytest.mark.kvm)])
def test_bsp_starts_the_ap_with_init_sipi_and_the_ap_runs(tmp_path, accel, request):
    if accel == "kvm":
        request.getfixturevalue("kvm_usable")
    proc = run_kernel(tmp_path, smp_kernels.ap_startup_kernel(), accel)
    assert proc.returncode != smp_kernels.exit_status(smp_kernels.GAVE_UP), \
        f"the AP never answered; stdout {proc.stdout!r}"
    # Exit value 0x10 | APIC ID 1; "AP1" came from the AP's own CPUID.
    assert proc.returncode == smp_kernels.exit_status(0x11), proc.stderr
    assert proc.stdout == b"B\nAP1\nOK\n"


def test_two_software_cpus_lose_no_update_to_shared_counters(tmp_path):
    """200k lock-inc and 200k spinlock-protected increments per CPU: the scheduler must never let the
    engines run at once (Unicorn's atomics are not host-atomic) yet must switch between them."""
    proc = run_kernel(tmp_path, smp_kernels.shared_memory_kernel(200_000), "tcg", timeout=120)
    outcomes = {smp_kernels.exit_status(v): name for v, name in (
        (smp_kernels.SHARED_OK, "ok"), (smp_kernels.SHARED_ATOMIC_LOST, "lock inc lost updates"),
        (smp_kernels.SHARED_LOCK_BROKEN, "spinlock let both CPUs in"), (smp_kernels.GAVE_UP, "AP never finished"))}
    assert outcomes.get(proc.returncode, proc.returncode) == "ok", proc.stderr


def test_a_cpu_spinning_with_pause_on_a_held_lock_gives_up_its_turn(tmp_path):
    """The same kernel in-process: spins on the lock the other CPU holds must end turns early (the block
    gate's PAUSE-spin yield), instead of burning each whole 4 ms turn."""
    machine = shared_memory_machine(tmp_path)
    try:
        machine.start()
        status = machine.wait()
        yields = sum(vcpu.spin_yields for vcpu in machine.vcpus)  # type: ignore[attr-defined]
    finally:
        machine.close()
    assert status == smp_kernels.exit_status(smp_kernels.SHARED_OK)
    assert yields > 0


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs a process allowed two host CPUs")
def test_software_vcpu_threads_share_one_host_cpu_while_they_run(tmp_path):
    """The two vCPU threads run on one host CPU (vcpu_placement.py: they take turns, and a turn handed to a
    thread on the same CPU costs no cross-CPU wake-up); the other threads and the caller stay free."""
    machine = shared_memory_machine(tmp_path)
    own = os.sched_getaffinity(0)
    machine.accel.placement.enabled = True   # as on a host without a spare CPU per vCPU (halt_poll.py)
    seen: set[tuple[frozenset[int], ...]] = set()
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            try:
                seen.add(tuple(frozenset(os.sched_getaffinity(tid)) for tid in machine.vcpu_thread_ids()
                               if tid is not None))
            except OSError:
                pass   # a vCPU thread ended
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    try:
        machine.start()
        sampler.start()
        status = machine.wait()
    finally:
        done.set()
        machine.close()
    sampler.join(timeout=10)
    assert status == smp_kernels.exit_status(smp_kernels.SHARED_OK)
    shared = [each for each in seen if len(each) == 2 and len(each[0]) == 1 and each[0] == each[1]]
    assert shared, f"the vCPU threads never shared one CPU: {seen}"
    assert os.sched_getaffinity(0) == own


def test_code_rewritten_by_one_software_cpu_runs_new_on_the_other(tmp_path):
    proc = run_kernel(tmp_path, smp_kernels.code_patch_kernel(), "tcg")
    outcomes = {smp_kernels.exit_status(v): name for v, name in (
        (smp_kernels.PATCH_OK, "ok"), (smp_kernels.PATCH_STALE, "AP ran a stale translation"),
        (smp_kernels.PATCH_WRONG_FIRST, "AP's first call returned the wrong value"),
        (smp_kernels.GAVE_UP, "AP never answered"))}
    assert outcomes.get(proc.returncode, proc.returncode) == "ok", proc.stderr


def test_software_cpu_count_is_bounded(tmp_path):
    proc = run_kernel(tmp_path, smp_kernels.ap_startup_kernel(), "tcg")
    assert proc.returncode == smp_kernels.exit_status(0x11)
    image = tmp_path / "k.bin"
    image.write_bytes(smp_kernels.ap_startup_kernel())
    too_many = subprocess.run(
        [sys.executable, "-m", "pyemu.system.main", "-M", "microvm", "-accel", "tcg", "-smp", "9",
         "-kernel", str(image), "-nographic"], stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    assert too_many.returncode == 1
    assert too_many.stderr.decode().strip().splitlines() == [
        "pyemu: -smp 9: the software CPU (-accel tcg) runs at most 8 vCPUs"]


@pytest.mark.assets
@pytest.mark.slow
def test_linux_boots_to_the_shell_on_two_software_cpus(console, guest_assets):
    vm = console(["-machine", "microvm", "-accel", "tcg", "-smp", "2", "-m", "512M",
                  "-kernel", str(guest_assets.vmlinux), "-initrd", str(guest_assets.initrd),
                  "-append", "console=ttyS0", "-nographic"])
    out = vm.expect(b"pyemu-guest: init reached", BOOT_TIMEOUT).decode(errors="replace")
    assert "smp: Brought up 1 node, 2 CPUs" in out
    assert "smpboot: Total of 2 processors activated" in out
    # The TSC must survive a busy host (run this beside `stress-ng --cpu 2`). Linux trusts it without its
    # clocksource watchdog because CPUID offers constant, nonstop TSC and TSC_ADJUST; otherwise the watchdog
    # compares it with jiffies, which a busy host delays (4 of 5 such boots lost the TSC).
    assert "Marking TSC unstable" not in out and "Switched to clocksource tsc" in out
    vm.expect(b"# ", 60)
    vm.send('echo "cpus=$(nproc) online=$(cat /sys/devices/system/cpu/online)"\n')
    vm.expect(b"online=0-1", 60)
    assert b"cpus=2 online=0-1" in vm.output
    # What check_system_tsc_reliable needs, as Linux saw it on each CPU.
    vm.send('echo "tf=$(for f in constant_tsc nonstop_tsc tsc_adjust; do echo -n "$f:$(grep -c -w $f '
            '/proc/cpuinfo) "; done)=tf"\n')
    tsc_flags = re.search(rb"tf=([\w: ]*)=tf\r?\n", vm.expect(b"=tf\r\n", 60))
    assert tsc_flags is not None and tsc_flags.group(1).split() == [
        b"constant_tsc:2", b"nonstop_tsc:2", b"tsc_adjust:2"], vm.output[-2000:]
    # IPIs flow both ways: function-call interrupts were taken on each CPU, and a shell pinned to CPU 1
    # by the scheduler runs there.
    vm.send("grep CAL /proc/interrupts\n")
    cal = re.search(rb"CAL:\s+(\d+)\s+(\d+)", vm.expect(b"Function call interrupts", 60))
    assert cal is not None and int(cal.group(1)) > 0 and int(cal.group(2)) > 0
    vm.send("taskset -c 1 sh -c 'echo on-cpu=$(cut -d\" \" -f39 /proc/self/stat)'\n")
    vm.expect(b"on-cpu=1", 60)
    # CPU hotplug: an offline CPU halts with interrupts disabled and is woken again by INIT and SIPI.
    vm.send("echo 0 > /sys/devices/system/cpu/cpu1/online; echo off=$(cat /sys/devices/system/cpu/online)=\n")
    vm.expect(b"off=0=", 60)
    vm.send("echo 1 > /sys/devices/system/cpu/cpu1/online; echo on=$(cat /sys/devices/system/cpu/online)=\n")
    vm.expect(b"on=0-1=", 60)
    vm.send("taskset -c 1 sh -c 'echo back-on-cpu=$(cut -d\" \" -f39 /proc/self/stat)'\n")
    vm.expect(b"back-on-cpu=1", 60)
    # Still on the TSC after the boot and the shell work (the watchdog checks every 0.5 s, any time).
    vm.send('echo "cs=$(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)=sc"\n')
    clocksource = re.search(rb"cs=([\w-]*)=sc\r?\n", vm.expect(b"=sc\r\n", 60))
    assert clocksource is not None and clocksource.group(1) == b"tsc", vm.output[-3000:].decode(errors="replace")
    # A machine reset puts the AP back to waiting for SIPI, and the kernel starts it again.
    vm.send("reboot -f\n")
    restarted_at = vm.expect(b"reboot: Restarting system", 60).index(b"reboot: Restarting system")
    again = vm.expect(b"pyemu-guest: init reached", BOOT_TIMEOUT, after=restarted_at)[restarted_at:]
    assert b"smp: Brought up 1 node, 2 CPUs" in again
    vm.expect(b"# ", 60, after=restarted_at)
    vm.send("poweroff -f\n")
    assert vm.wait(60) == 0


@pytest.mark.assets
@pytest.mark.slow
def test_linux_finds_two_cpus_in_the_madt_under_kvm(console, guest_assets, kvm_usable):
    vm = console(["-machine", "microvm", "-accel", "kvm", "-smp", "2", "-m", "512M",
                  "-kernel", str(guest_assets.vmlinux), "-initrd", str(guest_assets.initrd),
                  "-append", "console=ttyS0 earlyprintk=ttyS0", "-nographic"])
    out = vm.expect(b"smpboot: Allowing 2 CPUs", 90).decode(errors="replace")
    assert "ACPI: Using ACPI (MADT) for SMP configuration information" in out
    assert "smpboot: Allowing 2 CPUs, 0 hotplug CPUs" in vm.expect(b"hotplug CPUs", 10).decode(errors="replace")
