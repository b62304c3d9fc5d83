"""The example command lines of QEMU's microvm documentation (docs/system/i386/microvm.rst, "Running a
microvm-based VM"), run under pyemu as written there.

Substitutions, and why:

* ``-enable-kvm -cpu host`` becomes ``-accel tcg -cpu max``: the documentation's own rule for hosts
  without a KVM that can boot Linux (our hosts' KVM is PVM: Linux stops in early boot, with QEMU too);
* ``vmlinux`` and ``test.img`` become the default guest's kernel and a scratch disk, and ``-initrd`` with
  the default guest's initramfs is added after ``-kernel``, because ``test.img`` holds no root file
  system (``root=/dev/vda`` stays on the command line; the initramfs ignores it);
* the TAP device needs CAP_NET_ADMIN: pyemu runs inside a network namespace of the test's own (as in
  ``test_virtio_net_linux.py``) so ``-netdev tap,id=tap0,script=no,downscript=no`` stays unchanged;
  where no namespace can be made (not root), the ``-netdev``/``virtio-net-device`` pair is left out and
  the test says so.

Each run checks that the guest reaches its shell on the documented console (COM1, or ``hvc0`` through
``-chardev stdio`` and ``virtconsole``), sees the disk with the bytes the host wrote, and sees ``eth0``.
"""

from __future__ import annotations

import shlex
import subprocess
import sys

import pytest

from boot_helpers import ConsoleSession, shell
from test_virtio_net_linux import NamespacedSession, namespace  # noqa: F401 - fixture

pytestmark = [pytest.mark.slow, pytest.mark.assets]

BOOT_TIMEOUT = 240
DISK_MAGIC = b"PYEMU-MICROVM-DOC"

# Verbatim from docs/system/i386/microvm.rst (QEMU 7.2), program name and line continuations removed.
DOC_LEGACY = """
     -M microvm \\
     -enable-kvm -cpu host -m 512m -smp 2 \\
     -kernel vmlinux -append "earlyprintk=ttyS0 console=ttyS0 root=/dev/vda" \\
     -nodefaults -no-user-config -nographic \\
     -serial stdio \\
     -drive id=test,file=test.img,format=raw,if=none \\
     -device virtio-blk-device,drive=test \\
     -netdev tap,id=tap0,script=no,downscript=no \\
     -device virtio-net-device,netdev=tap0
"""
DOC_NO_LEGACY = """
     -M microvm,x-option-roms=off,pit=off,pic=off,isa-serial=off,rtc=off \\
     -enable-kvm -cpu host -m 512m -smp 2 \\
     -kernel vmlinux -append "console=hvc0 root=/dev/vda" \\
     -nodefaults -no-user-config -nographic \\
     -chardev stdio,id=virtiocon0 \\
     -device virtio-serial-device \\
     -device virtconsole,chardev=virtiocon0 \\
     -drive id=test,file=test.img,format=raw,if=none \\
     -device virtio-blk-device,drive=test \\
     -netdev tap,id=tap0,script=no,downscript=no \\
     -device virtio-net-device,netdev=tap0
"""


def substitute(doc: str, *, vmlinux: str, initrd: str, image: str, with_tap: bool) -> list[str]:
    """The documented argv with only the substitutions the module docstring lists."""
    words = shlex.split(doc.replace("\\\n", " "))
    out: list[str] = []
    i = 0
    while i < len(words):
        word = words[i]
        if word == "-enable-kvm":
            out += ["-accel", "tcg"]
        elif word == "-cpu" and words[i + 1] == "host":
            out += ["-cpu", "max"]
            i += 1
        elif word == "-kernel" and words[i + 1] == "vmlinux":
            out += ["-kernel", vmlinux, "-initrd", initrd]
            i += 1
        elif word == "-drive":
            out += ["-drive", words[i + 1].replace("file=test.img", f"file={image}")]
            i += 1
        elif not with_tap and word in ("-netdev", "-device") and "tap0" in words[i + 1]:
            i += 1  # no network namespace (not root): the TAP backend and its NIC are left out
        else:
            out.append(word)
        i += 1
    return out


@pytest.fixture
def netns(request: pytest.FixtureRequest) -> str | None:
    """A private network namespace for the TAP device, or None where none can be made."""
    try:
        return str(request.getfixturevalue("namespace"))
    except pytest.skip.Exception as why:
        sys.stderr.write(f"microvm doc test without -netdev tap: {why}\n")
        return None


@pytest.mark.parametrize("doc", [DOC_LEGACY, DOC_NO_LEGACY], ids=["legacy-devices", "no-legacy-devices"])
def test_microvm_documentation_command_line(doc, netns, guest_assets, tmp_path):
    image = tmp_path / "test.img"
    with open(image, "wb") as handle:
        handle.write(DISK_MAGIC)
        handle.truncate(16 << 20)
    argv = substitute(doc, vmlinux=str(guest_assets.vmlinux), initrd=str(guest_assets.initrd),
                      image=str(image), with_tap=netns is not None)
    assert argv[:2] == ["-M", doc.split()[1]]  # the board options exactly as documented
    vm: ConsoleSession = NamespacedSession(netns, argv) if netns else ConsoleSession(argv)
    try:
        vm.expect(b"built-in shell", BOOT_TIMEOUT)
        vm.expect(b"# ", 60)
        status, out = shell(vm, f"cat /sys/block/vda/size; head -c {len(DISK_MAGIC)} /dev/vda; echo; tty")
        assert status == 0, out
        lines = out.split()
        assert lines[:2] == [str((16 << 20) // 512), DISK_MAGIC.decode()], out
        assert lines[2] == ("/dev/ttyS0" if "console=ttyS0" in doc else "/dev/hvc0"), out
        if netns is not None:
            status, out = shell(vm, "cat /sys/class/net/eth0/address")
            assert status == 0 and out.count(":") == 5, out
        vm.send("poweroff -f\n")
        assert vm.wait(60) == 0
    except subprocess.TimeoutExpired:
        raise AssertionError(f"pyemu did not exit after poweroff -f; console tail:\n"
                             f"{vm.output[-2000:].decode(errors='replace')}") from None
    finally:
        vm.close()
