"""Command lines people and management tools (libvirt) write: QEMU's spellings, meanings and messages for
-cpu, -smp topology, -m size=, -rtc, -msg, -global, -overcommit, -boot, -object secret/throttle-group,
-serial chardev:ID, machine properties and -daemonize."""

from __future__ import annotations

import calendar
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from pyemu.errors import ConfigError
from pyemu.machines.device_props import PropReader, check_globals
from pyemu.system.config import DeviceOptions, VmConfig
from pyemu.system.options import EarlyExit, parse_args
from pyemu.system.rtc_options import RtcOptions
from pyemu.target.x86.boot.synthetic import make_multiboot_binary

SPIN = b"\xeb\xfe"  # jmp $


@pytest.fixture
def spin_kernel(tmp_path):
    path = tmp_path / "spin.bin"
    path.write_bytes(make_multiboot_binary(SPIN))
    return str(path)


def pyemu(*args: str, timeout: float = 60, cwd: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyemu.system.main", *args], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout, cwd=cwd)


def build_board(config: VmConfig, kernel: str):
    from pyemu.accel.tcg.accel import TcgAccelerator
    from pyemu.machines.microvm import BootSource, Microvm

    return Microvm.create(config, TcgAccelerator(), BootSource(kernel, None, config.append))


# -- -cpu ------------------------------------------------------------------------------------------------
def test_cpu_host_and_max_are_accepted_and_host_needs_kvm():
    assert parse_args(["-cpu", "max"]).cpu.model == "max"
    config = parse_args(["-cpu", "host,migratable=on"])
    assert config.cpu.model == "host"
    config.check_accelerator("kvm")
    with pytest.raises(ConfigError, match="^CPU model 'host' requires KVM or HVF$"):
        config.check_accelerator("tcg")
    with pytest.raises(EarlyExit, match="x86 max"):
        parse_args(["-cpu", "help"])


@pytest.mark.parametrize("value,fragment", [
    ("bogus", "unable to find CPU model 'bogus'"),
    ("max,+bogus", "Property 'max-x86_64-cpu.bogus' not found"),
    ("max,bogus=on", "can't apply global max-x86_64-cpu.bogus=on: Property 'max-x86_64-cpu.bogus' not found"),
    ("host,migratable=maybe", "expects 'on' or 'off'"),
])
def test_cpu_refusals(value, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        parse_args(["-cpu", value])


def test_cpu_feature_switches_in_qemu_spellings(spin_kernel):
    config = parse_args(["-cpu", "max,-sse4.2,popcnt=off,+lm,tsc-deadline=off,migratable=on", "-kernel", spin_kernel,
                         "-serial", "null", "-m", "32"])
    assert config.cpu.feature_switches() == {"sse4_2": False, "popcnt": False, "lm": True, "tsc_deadline": False}
    machine = build_board(config, spin_kernel)
    try:
        assert not machine.cpuid.has("sse4_2") and not machine.cpuid.has("popcnt")
        assert machine.cpuid.has("lm") and machine.cpuid.has("sse4_1")
    finally:
        machine.close()
    # Switching on what the accelerator lacks drops it with QEMU's warning (the software CPU has no x2APIC),
    # or fails with enforce=on.
    config = parse_args(["-cpu", "max,+x2apic", "-kernel", spin_kernel, "-serial", "null", "-m", "32"])
    machine = build_board(config, spin_kernel)
    try:
        assert not machine.cpuid.has("x2apic") and machine.cpuid.has("smap")
    finally:
        machine.close()
    config = parse_args(["-cpu", "max,+x2apic,enforce=on", "-kernel", spin_kernel, "-serial", "null", "-m", "32"])
    with pytest.raises(ConfigError, match=re.escape("TCG doesn't support requested feature: CPUID.01H:ECX.x2apic "
                                                    "[bit 21]")):
        build_board(config, spin_kernel)


def test_cpu_host_under_tcg_is_one_line_from_the_command(spin_kernel):
    result = pyemu("-accel", "tcg", "-cpu", "host", "-kernel", spin_kernel, "-serial", "none", "-m", "32")
    assert result.returncode == 1
    assert result.stderr == "pyemu: CPU model 'host' requires KVM or HVF\n"


# -- -smp and -m ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value,expected", [
    ("2", (2, 1, 2, 1, 2)),  # QEMU 7.2 prefers cores for microvm
    ("4,sockets=2,cores=2,threads=1", (4, 2, 2, 1, 4)),
    ("sockets=2,cores=2", (4, 2, 2, 1, 4)),
    ("cpus=2,maxcpus=4", (2, 1, 4, 1, 4)),
    ("4,sockets=1,dies=1,cores=4,threads=1", (4, 1, 4, 1, 4)),  # libvirt's spelling
    ("4,threads=2", (4, 1, 2, 2, 4)),
    ("4,cores=2", (4, 2, 2, 1, 4)),
])
def test_smp_topology_is_computed_as_qemu(value, expected):
    config = parse_args(["-smp", value])
    topo = config.topology
    assert (topo.cpus, topo.sockets, topo.cores, topo.threads, topo.maxcpus) == expected
    assert config.vcpus == expected[0]


@pytest.mark.parametrize("value,message", [
    ("2,sockets=3", "Invalid CPU topology: product of the hierarchy must match maxcpus: sockets (3) * cores (0) "
                    "* threads (1) != maxcpus (2)"),
    ("2,maxcpus=1", "Invalid CPU topology: maxcpus must be equal to or greater than smp: sockets (1) * cores (1) "
                    "* threads (1) == maxcpus (1) < smp_cpus (2)"),
    ("2,sockets=1,cores=1,threads=1,maxcpus=2", "product of the hierarchy must match maxcpus"),
    ("4,dies=2", "dies not supported"),
    ("2,bogus=1", "Invalid parameter 'bogus'"),
    ("2,sockets=x", "Parameter 'sockets' expects a number"),
])
def test_smp_topology_errors_are_qemus(value, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_args(["-smp", value])


def test_memory_size_key_and_refused_hotplug():
    assert parse_args(["-m", "size=256M"]).ram_size == 256 << 20
    with pytest.raises(ConfigError, match="memory hotplug is not supported"):
        parse_args(["-m", "size=256M,slots=2,maxmem=1G"])


# -- -rtc ------------------------------------------------------------------------------------------------
def test_rtc_bases_set_the_time_source():
    host = 1_700_000_000 * 10**9
    clock = [host]

    def now() -> int:
        return clock[0]

    assert parse_args(["-rtc", "base=utc"]).rtc.time_source(now)() == host
    date = parse_args(["-rtc", "base=2006-06-17T16:01:21,clock=vm"]).rtc.time_source(now)
    start = calendar.timegm((2006, 6, 17, 16, 1, 21, 0, 0, 0)) * 10**9
    assert date() == start
    clock[0] += 5 * 10**9  # a reset later: DATE plus the time the VM has existed, as QEMU
    assert date() == start + 5 * 10**9
    assert parse_args(["-rtc", "base=2006-06-17"]).rtc.time_source(now)() == \
        calendar.timegm((2006, 6, 17, 0, 0, 0, 0, 0, 0)) * 10**9
    local = RtcOptions(base="localtime").time_source(now)()
    assert local - clock[0] == time.localtime(clock[0] // 10**9).tm_gmtoff * 10**9


@pytest.mark.parametrize("value,fragment", [
    ("base=bogus", "invalid datetime format"),
    ("base=2006-13-40", "invalid datetime format"),
    ("clock=bogus", "invalid option value 'bogus'"),
    ("clock=rt", "clock=rt: not supported by pyemu"),
    ("driftfix=fast", "invalid option value 'fast'"),
    ("speed=1", "Invalid parameter 'speed'"),
])
def test_rtc_errors(value, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        parse_args(["-rtc", value])


def test_rtc_driftfix_slew_is_accepted_with_a_warning(tmp_path):
    config = parse_args(["-rtc", "base=utc,driftfix=slew"])
    assert config.rtc.driftfix == "slew" and "driftfix=slew" in config.warnings()[0]
    result = pyemu("-msg", "timestamp=on", "-rtc", "base=utc,driftfix=slew", "-kernel", str(tmp_path / "none"))
    assert re.match(r"\S+Z pyemu: warning: -rtc driftfix=slew: ", result.stderr), result.stderr


def test_rtc_base_date_reaches_the_boards_rtc(spin_kernel):
    config = VmConfig(ram_size=32 << 20, kernel=spin_kernel, serial=("null",),
                      rtc=RtcOptions(base="2006-06-17T16:01:21"))
    machine = build_board(config, spin_kernel)
    try:
        shown = machine.rtc.guest_time_ns() // 10**9
        start = calendar.timegm((2006, 6, 17, 16, 1, 21, 0, 0, 0))
        assert start <= shown < start + 600  # the board was built moments ago (generous for busy hosts)
    finally:
        machine.close()


# -- -msg ------------------------------------------------------------------------------------------------
def test_msg_timestamp_prefixes_error_lines(spin_kernel):
    result = pyemu("-msg", "timestamp=on", "-name", "guest=vm7", "-cpu", "bogus")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z pyemu: unable to find CPU model 'bogus'.*\n",
                        result.stderr), result.stderr
    result = pyemu("-msg", "timestamp=on,guest-name=on", "-name", "vm7", "-accel", "tcg", "-cpu", "host",
                   "-kernel", spin_kernel, "-serial", "none", "-m", "32")
    assert re.fullmatch(r"\S+Z vm7 pyemu: CPU model 'host' requires KVM or HVF\n", result.stderr), result.stderr
    with pytest.raises(ConfigError, match="Parameter 'timestamp' expects 'on' or 'off'"):
        parse_args(["-msg", "timestamp=maybe"])


# -- -global ---------------------------------------------------------------------------------------------
def test_global_forms():
    config = parse_args(["-global", "virtio-blk-device.num-queues=2", "-global",
                         "driver=virtio-rng-device,property=max-bytes,value=1024"])
    assert [(g.driver, g.property, g.value) for g in config.globals] == [
        ("virtio-blk-device", "num-queues", "2"), ("virtio-rng-device", "max-bytes", "1024")]
    with pytest.raises(ConfigError, match="Invalid format"):
        parse_args(["-global", "foo"])
    with pytest.raises(ConfigError, match="Parameter 'value' is missing"):
        parse_args(["-global", "driver=a,property=b"])


def test_global_is_a_default_that_the_device_overrides():
    config = parse_args(["-global", "virtio-blk-device.serial=from-global", "-global", "virtio-blk-device.x=1"])
    device = config.with_globals(DeviceOptions("virtio-blk-device", (("serial", "own"), ("x", "2"))))
    props = PropReader(device)
    assert props.text("serial") == "own" and props.text("x") == "2"
    props = PropReader(config.with_globals(DeviceOptions("virtio-blk-device")))
    assert props.text("serial") == "from-global"
    with pytest.raises(ConfigError, match=re.escape("-device virtio-blk-device: can't apply global "
                                                    "virtio-blk-device.x=1: Property 'virtio-blk-device.x' "
                                                    "not found")):
        props.finish()
    assert config.with_globals(DeviceOptions("virtio-rng-device")).globals == ()


def test_globals_of_board_drivers_and_unknown_drivers():
    is_device = {"virtio-blk-device"}.__contains__
    config = parse_args(["-global", "virtio-mmio.force-legacy=false", "-global", "kvm-pit.lost_tick_policy=delay",
                         "-global", "virtio-blk-device.whatever=1", "-global", "bogus.x=1"])
    assert check_globals(config.globals, is_device) == ["global bogus.x has invalid class name"]
    for text, fragment in (("virtio-mmio.force-legacy=true", "pyemu's virtio-mmio transport is virtio 1.x (version 2) only"),
                           ("virtio-mmio.force-legacy=maybe", "Parameter 'force-legacy' expects 'on' or 'off'"),
                           ("virtio-mmio.bogus=1", "Property 'virtio-mmio.bogus' not found")):
        with pytest.raises(ConfigError, match=re.escape(f"can't apply global {text}: {fragment}")):
            check_globals(parse_args(["-global", text]).globals, is_device)


def test_global_error_from_the_command(tmp_path, spin_kernel):
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(1 << 20))
    result = pyemu("-accel", "tcg", "-m", "32", "-kernel", spin_kernel, "-serial", "none",
                   "-global", "virtio-blk-device.bogus=1", "-drive", f"file={disk},if=none,id=d,format=raw",
                   "-device", "virtio-blk-device,drive=d")
    assert result.returncode == 1
    assert result.stderr == ("pyemu: -device virtio-blk-device: can't apply global virtio-blk-device.bogus=1: "
                             "Property 'virtio-blk-device.bogus' not found\n")


# -- -overcommit, -boot ---------------------------------------------------------------------------------
def test_overcommit():
    config = parse_args(["-overcommit", "mem-lock=off,cpu-pm=on"])
    assert not config.overcommit.mem_lock and config.overcommit.cpu_pm
    config.check_accelerator("tcg")
    with pytest.raises(ConfigError, match="cpu-pm=on is not supported by pyemu with -accel kvm"):
        config.check_accelerator("kvm")
    with pytest.raises(ConfigError, match="Invalid parameter 'bogus'"):
        parse_args(["-overcommit", "bogus=on"])


def test_overcommit_mem_lock_locks_the_process_memory():
    """In a child process: after lock_memory() the kernel reports locked pages (VmLck)."""
    code = ("from pyemu.system.options import parse_args\n"
            "from pyemu.errors import ConfigError\n"
            "try:\n"
            "    parse_args(['-overcommit', 'mem-lock=on']).overcommit.lock_memory()\n"
            "except ConfigError as error:\n"
            "    print('ERROR', error); raise SystemExit(0)\n"
            "print([l for l in open('/proc/self/status') if l.startswith('VmLck')][0].split()[1])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    if out.startswith("ERROR"):
        assert "locking memory failed (mlockall: " in out  # RLIMIT_MEMLOCK too small: QEMU's failure
    else:
        assert int(out) > 0, out


@pytest.mark.parametrize("value", ["order=c", "c", "order=cdn,once=d,strict=on,reboot-timeout=5000",
                                   "menu=off,splash-time=0"])
def test_boot_accepted(value):
    parse_args(["-boot", value])


@pytest.mark.parametrize("value,fragment", [
    ("order=z", "Invalid boot device 'z'"),
    ("order=cc", "Boot device 'c' was given twice"),
    ("bogus=1", "Parameter 'boot.bogus' is unexpected"),
    ("menu=on", "menu=on and splash= need firmware"),
    ("reboot-timeout=70000", "reboot timeout is larger than 65535"),
])
def test_boot_refused(value, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        parse_args(["-boot", value])


# -- -object secret / throttle-group ------------------------------------------------------------------
def test_secret_objects(tmp_path):
    path = tmp_path / "pw"
    path.write_bytes(b"from-file")
    config = parse_args(["-object", "secret,id=a,data=letmein", "-object", f"secret,id=b,file={path}",
                         "-object", "secret,id=c,data=aGVsbG8=,format=base64"])
    secrets = config.backend_objects
    assert [secrets[k].data for k in "abc"] == [b"letmein", b"from-file", b"hello"]  # type: ignore[union-attr]
    assert "letmein" not in repr(secrets["a"])


@pytest.mark.parametrize("value,fragment", [
    ("secret,id=s", "Either 'file' or 'data' must be provided"),
    ("secret,id=s,data=x,file=/etc/hostname", "'file' and 'data' are mutually exclusive"),
    ("secret,id=s,file=/nonexistent/pw", "Unable to read /nonexistent/pw: No such file or directory"),
    ("secret,id=s,data=!!,format=base64", "not valid base64"),
    ("secret,id=s,data=x,keyid=k", "encrypted secrets"),
    ("secret,id=s,data=x,bogus=1", "Property 'secret.bogus' not found"),
    ("throttle-group,id=t,x-iops-total=-1", "Property values cannot be negative"),
    ("throttle-group,id=t,bogus=1", "Invalid parameter 'bogus'"),
    ("throttle-group,id=t,x-iops-total=10,x-iops-read=5", "cannot be used at the same time"),
    ("throttle-group,id=t,x-bps-total-max=10", "require corresponding bps/iops values"),
])
def test_object_errors(value, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        parse_args(["-object", value])


def test_throttle_group_is_kept():
    config = parse_args(["-object", "throttle-group,id=t0,x-iops-total=100,limits.bps-total=1048576,"
                         "x-iops-total-max=200"])
    group = config.backend_objects["t0"]
    assert group.limit("iops-total") == 100 and group.limit("bps-total") == 1 << 20  # type: ignore[union-attr]
    assert group.limit("iops-total-max") == 200  # type: ignore[union-attr]


def test_secret_and_throttle_group_do_not_stop_the_board(spin_kernel):
    config = parse_args(["-object", "secret,id=s0,data=x", "-object", "throttle-group,id=t0,x-iops-total=5",
                         "-kernel", spin_kernel, "-serial", "null", "-m", "32"])
    build_board(config, spin_kernel).close()


# -- -serial chardev:ID --------------------------------------------------------------------------------
def test_serial_chardev_reference(tmp_path):
    out = tmp_path / "com1.txt"
    kernel = tmp_path / "hello.bin"
    from pyemu.testing.asm import assemble

    code = assemble("mov dx, 0x3f8\n mov al, 0x4f\n out dx, al\n mov al, 0x4b\n out dx, al\n"
                    "mov dx, 0xf4\n mov al, 0\n out dx, al\n hlt", address=0x100000 + 32, bits=32)
    kernel.write_bytes(make_multiboot_binary(code))
    result = pyemu("-accel", "tcg", "-m", "32", "-kernel", str(kernel), "-chardev", f"file,id=log,path={out}",
                   "-serial", "chardev:log", "-device", "isa-debug-exit,iobase=0xf4,iosize=1")
    assert result.returncode == 1, result.stderr  # isa-debug-exit: (0 << 1) | 1
    assert out.read_bytes() == b"OK"


def test_serial_chardev_is_listed_under_its_id(tmp_path, spin_kernel):
    config = parse_args(["-chardev", f"file,id=log,path={tmp_path / 'out'}", "-serial", "chardev:log",
                         "-serial", "null", "-kernel", spin_kernel, "-m", "32"])
    machine = build_board(config, spin_kernel)
    try:
        assert [use.label for use in machine.chardevs.uses()] == ["log", "serial1"]  # as QEMU's query-chardev
    finally:
        machine.close()


@pytest.mark.parametrize("argv,fragment", [
    (["-serial", "chardev:nope"], "-serial chardev:nope: could not connect serial device to character backend "
                                  "'chardev:nope'"),
    (["-chardev", "null,id=c", "-serial", "chardev:c", "-device", "virtconsole,chardev=c"],
     "chardev 'c' is already in use by device virtconsole"),
    (["-serial", "chardev:"], "could not connect serial device to character backend 'chardev:'"),
])
def test_serial_chardev_errors(argv, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        parse_args(argv)


# -- machine properties ---------------------------------------------------------------------------------
def test_machine_properties():
    machine = parse_args(["-M", "microvm,x-option-roms=off,auto-kernel-cmdline=off,usb=off,"
                                "dump-guest-core=off,pit=off"]).machine
    assert (machine.x_option_roms, machine.auto_kernel_cmdline, machine.usb, machine.dump_guest_core) == \
        (False, False, False, False)
    with pytest.raises(ConfigError, match="no USB controller"):
        parse_args(["-M", "microvm,usb=on"])
    with pytest.raises(ConfigError, match="Parameter 'x-option-roms' expects 'on' or 'off'"):
        parse_args(["-M", "microvm,x-option-roms=maybe"])


@pytest.mark.parametrize("acpi,auto,expected", [
    ("off", "on", "console=ttyS0 virtio_mmio.device=512@0xfeb00000:16 virtio_mmio.device=512@0xfeb00200:17"),
    ("off", "off", "console=ttyS0"),
    ("on", "on", "console=ttyS0"),
])
def test_auto_kernel_cmdline_announces_virtio_devices_without_acpi(spin_kernel, acpi, auto, expected):
    from pyemu.machines import memmap

    config = parse_args(["-M", f"microvm,acpi={acpi},auto-kernel-cmdline={auto}", "-kernel", spin_kernel,
                         "-append", "console=ttyS0", "-serial", "null", "-m", "32",
                         "-object", "rng-random,id=r,filename=/dev/urandom", "-device", "virtio-rng-device,rng=r",
                         "-device", "virtio-serial-device"])
    machine = build_board(config, spin_kernel)
    try:
        base, gsi = memmap.VIRTIO_MMIO_BASE, memmap.VIRTIO_MMIO_FIRST_GSI
        assert machine.kernel_cmdline() == expected.replace("0xfeb00000:16", f"{base:#x}:{gsi}").replace(
            "0xfeb00200:17", f"{base + memmap.VIRTIO_MMIO_SLOT_SIZE:#x}:{gsi + 1}")
    finally:
        machine.close()


def test_dump_guest_core_off_marks_guest_ram(spin_kernel):
    config = parse_args(["-M", "microvm,dump-guest-core=off", "-kernel", spin_kernel, "-serial", "null",
                         "-m", "32"])
    machine = build_board(config, spin_kernel)
    try:
        start = machine.memory.host_address(machine.memory.regions[0])
        with open("/proc/self/smaps") as smaps:
            text = smaps.read()
        header = re.search(rf"^{start:x}-[0-9a-f]+ .*$", text, re.MULTILINE)
        assert header is not None
        flags = text[header.end():].split("VmFlags:", 1)[1].splitlines()[0].split()
        assert "dd" in flags  # "do not include area into core dump"
    finally:
        machine.close()


# -- -daemonize -----------------------------------------------------------------------------------------
def test_daemonize_refuses_stdio():
    with pytest.raises(ConfigError, match="^-nographic cannot be used with -daemonize$"):
        parse_args(["-daemonize", "-nographic"])
    with pytest.raises(ConfigError, match="^-serial stdio: cannot use stdio with -daemonize$"):
        parse_args(["-daemonize", "-serial", "stdio"])
    with pytest.raises(ConfigError, match="^-chardev stdio,id=c: cannot use stdio with -daemonize$"):
        parse_args(["-daemonize", "-chardev", "stdio,id=c", "-serial", "none"])
    # QEMU accepts -nographic with -nodefaults (nothing on stdio); COM1's stdio default becomes null.
    assert parse_args(["-daemonize", "-nodefaults", "-nographic"]).daemonize
    assert parse_args(["-daemonize"]).serial == ("null",)


def _process_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as status:
            return any(line.startswith("State:") and "Z" in line.split()[1] for line in status)
    except FileNotFoundError:
        return True


def test_daemonize_returns_when_the_vm_is_set_up(tmp_path, spin_kernel):
    pidfile = tmp_path / "vm.pid"
    sock = f"/tmp/pyemu-h3-{os.getpid()}.qmp"
    result = pyemu("-daemonize", "-accel", "tcg", "-m", "32", "-kernel", spin_kernel, "-pidfile", str(pidfile),
                   "-qmp", f"unix:{sock},server=on,wait=off", "-name", "daemon-test", cwd=str(tmp_path))
    pid = None
    try:
        assert result.returncode == 0, result.stderr
        assert result.stdout == "" and result.stderr == ""
        # When the command returned, the pid file and the monitor existed.
        pid = int(pidfile.read_text())
        assert os.path.exists(sock)
        assert not _process_gone(pid)
        assert os.getsid(pid) != os.getsid(0)  # its own session
        assert os.readlink(f"/proc/{pid}/cwd") == str(tmp_path)  # chdir stays
        assert {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in (0, 1, 2)} == {os.devnull}
    finally:
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 30
            while not _process_gone(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
        if os.path.exists(sock):
            os.unlink(sock)
    assert _process_gone(pid)
    assert not pidfile.exists()  # removed at exit


def test_daemonize_reports_a_failed_set_up(tmp_path):
    result = pyemu("-daemonize", "-accel", "tcg", "-m", "32", "-kernel", str(tmp_path / "missing"),
                   "-pidfile", str(tmp_path / "vm.pid"))
    assert result.returncode == 1
    assert "missing" in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "vm.pid").exists()


def test_nodefaults_drops_the_default_serial_port() -> None:
    assert parse_args([]).serial_specs() == ("stdio",)
    assert parse_args(["-nodefaults"]).serial_specs() == ()
    assert parse_args(["-nodefaults", "-serial", "null"]).serial_specs() == ("null",)


# -- -object memory-backend-ram|memfd + -machine memory-backend= --------------------------------------------

def test_memory_backend_gives_guest_ram_its_size_and_kind(spin_kernel):
    config = parse_args(["-object", "memory-backend-memfd,id=mem,size=64M", "-M", "microvm,memory-backend=mem",
                         "-kernel", spin_kernel, "-serial", "null"])
    assert (config.ram_size, config.ram_backend, config.ram_sealed) == (64 << 20, "memfd", True)
    machine = build_board(config, spin_kernel)
    try:
        memory = machine.memory
        assert memory.backend == "memfd" and memory.total_size == 64 << 20 and memory.fd >= 0
        with pytest.raises(OSError):  # sealed: the memfd cannot grow under the guest
            os.ftruncate(memory.fd, 128 << 20)
        memory.write(0x1000, b"shared")
        assert os.pread(memory.fd, 6, 0x1000) == b"shared"  # what another process mapping the fd would see
    finally:
        machine.close()


def test_default_and_ram_backend_are_private_anonymous_memory(spin_kernel):
    default = parse_args(["-kernel", spin_kernel, "-m", "32"])
    assert default.ram_backend == "ram"
    config = parse_args(["-m", "32M", "-object", "memory-backend-ram,id=pc.ram,size=32M",
                         "-machine", "memory-backend=pc.ram", "-kernel", spin_kernel, "-serial", "null"])
    assert (config.ram_size, config.ram_backend) == (32 << 20, "ram")
    machine = build_board(config, spin_kernel)
    try:
        assert machine.memory.backend == "ram" and machine.memory.fd == -1
    finally:
        machine.close()
    shared = parse_args(["-object", "memory-backend-ram,id=m,size=32M,share=on", "-M", "memory-backend=m"])
    assert (shared.ram_backend, shared.ram_sealed) == ("memfd", False)


@pytest.mark.parametrize("args,message", [
    (["-M", "microvm,memory-backend=foo"], "Memory backend 'foo' not found"),
    (["-object", "iothread,id=m", "-M", "memory-backend=m"], "Memory backend 'm' not found"),
    (["-object", "memory-backend-ram,id=m,size=256M", "-M", "memory-backend=m", "-m", "512M"],
     "Machine memory size does not match the size of the memory backend"),
    (["-object", "memory-backend-ram,id=m"], "-object memory-backend-ram,id=m: Parameter 'size' is missing"),
    (["-object", "memory-backend-ram,id=m,size=32M,bogus=1"], "Invalid parameter 'bogus'"),
    (["-object", "memory-backend-ram,id=m,size=32M,prealloc=on"], "prealloc=on is not supported by pyemu"),
    (["-object", "memory-backend-memfd,id=m,size=32M,hugetlb=on"], "hugetlb=on is not supported by pyemu"),
    (["-object", "memory-backend-memfd,id=m,size=32M,share=off"], "share=off is not supported by pyemu"),
    (["-object", "memory-backend-ram,id=m,size=32M,seal=on"], "Invalid parameter 'seal'"),
    (["-object", "memory-backend-ram,id=m,size=lots"], "invalid size 'lots'"),
    (["-object", "memory-backend-ram,id=m,size=0"], "can't create backend with size 0"),
])
def test_memory_backend_mistakes_get_qemus_messages(args, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_args(args)


def test_memory_backend_on_the_command_line(spin_kernel):
    """The whole path, as a user runs it: pyemu starts (paused) with a memfd backend, and refuses a wrong one."""
    bad = pyemu("-object", "memory-backend-ram,id=m,size=64M", "-M", "microvm,memory-backend=m", "-m", "32M",
                "-kernel", spin_kernel, "-nographic", "-S")
    assert bad.returncode == 1 and "Machine memory size does not match" in bad.stderr
    assert "Traceback" not in bad.stderr
