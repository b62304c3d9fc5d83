"""Issue 11's error cases of live backup over QMP, each run on pyemu and on ``qemu-system-x86_64 -M microvm -S``
with the same nodes: unknown nodes, a duplicate bitmap (alone and inside a transaction), bitmaps a read-only
image holds, a backup to a too-small or read-only target and the other blockdev-backup argument checks. Each
must be a ``GenericError`` with QEMU 7.2's message and change nothing: the node list, every node's bitmaps
and the job list are the same afterwards (a failed transaction leaves no half of itself behind).

No guest is needed (the VM never runs); pyemu runs as its own process, as QEMU does, so both are driven by
the same ``qemu.qmp`` client."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from pyemu.target.x86.boot.synthetic import make_multiboot_binary

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img not installed")

MiB = 1 << 20
KINDS = ["pyemu", pytest.param("qemu", marks=pytest.mark.skipif(
    shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 not installed"))]


class Vm:
    """A stopped VM (-S) with disk node d0 (qcow2, 16 MiB) under device vblk0 and a QMP session."""

    def __init__(self, kind: str, work: Path) -> None:
        from qemu.qmp.legacy import QEMUMonitorProtocol

        for name, size in (("disk", 16), ("target", 16), ("small", 8), ("ro", 16)):
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(work / f"{name}.qcow2"), f"{size}M"],
                           check=True)
        # A persistent bitmap made by QEMU's tools: loaded read-only when its image is opened read-only.
        subprocess.run(["qemu-img", "bitmap", "--add", str(work / "ro.qcow2"), "pb"], check=True)
        sock = work / f"{kind}.sock"
        common = ["-S", "-qmp", f"unix:{sock},server=on,wait=off",
                  "-blockdev", f"driver=file,node-name=f0,filename={work / 'disk.qcow2'}",
                  "-blockdev", "driver=qcow2,node-name=d0,file=f0",
                  "-device", "virtio-blk-device,drive=d0,id=vblk0"]
        if kind == "qemu":
            argv = ["qemu-system-x86_64", "-M", "microvm", "-nodefaults", "-display", "none", *common]
        else:
            kernel = work / "spin.bin"
            kernel.write_bytes(make_multiboot_binary(b"\xeb\xfe"))
            argv = [sys.executable, "-m", "pyemu.system.main", "-kernel", str(kernel), "-m", "32",
                    "-serial", "none", "-display", "none", *common]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while not sock.exists():
            assert self.proc.poll() is None, self.proc.stderr.read() if self.proc.stderr else ""
            assert time.monotonic() < deadline, "no QMP socket"
            time.sleep(0.05)
        self.qmp = QEMUMonitorProtocol(str(sock))
        self.qmp.connect(negotiate=True)
        for node, image, read_only in (("t0", "target", False), ("small", "small", False), ("ro", "ro", True)):
            self.ok("blockdev-add", {"driver": "qcow2", "node-name": node, "read-only": read_only,
                                     "file": {"driver": "file", "filename": str(work / f"{image}.qcow2")}})
        self.ok("block-dirty-bitmap-add", {"node": "d0", "name": "b0"})

    def ok(self, command: str, args: dict[str, Any] | None = None) -> Any:
        reply = self.qmp.cmd_raw(command, args or {})
        assert "return" in reply, f"{command} {args}: {reply}"
        return reply["return"]

    def state(self) -> tuple[Any, ...]:
        """What a failed command must leave as it was: nodes, their bitmaps, jobs."""
        nodes = sorted((n["node-name"], n["ro"], n["drv"],
                        sorted((b.get("name"), b["granularity"], b["recording"], b["persistent"], b["count"])
                               for b in n.get("dirty-bitmaps", [])))
                       for n in self.ok("query-named-block-nodes"))
        return nodes, self.ok("query-jobs")

    def close(self) -> None:
        try:
            self.qmp.close()
        finally:
            self.proc.kill()
            self.proc.wait()
            if self.proc.stderr is not None:
                self.proc.stderr.close()


@pytest.fixture(params=KINDS)
def vm(request: pytest.FixtureRequest, short_dir: Path) -> Iterator[Vm]:
    machine = Vm(request.param, short_dir)
    yield machine
    machine.close()


def backup(target: str, **extra: Any) -> dict[str, Any]:
    return {"device": "d0", "target": target, "sync": "full", "job-id": "j0", **extra}


NOT_FOUND = "Cannot find device='nope' nor node-name='nope'"
CASES: list[tuple[str, str, dict[str, Any], str]] = [
    ("bitmap-add-unknown-node", "block-dirty-bitmap-add", {"node": "nope", "name": "b"}, NOT_FOUND),
    # QEMU: add looks the node up as a device or node name; the verbs on an existing bitmap say "Node".
    *[(f"bitmap-{verb}-unknown-node", f"block-dirty-bitmap-{verb}", {"node": "nope", "name": "b0"},
       "Node 'nope' not found") for verb in ("clear", "remove", "enable", "disable")],
    ("bitmap-merge-unknown-node", "block-dirty-bitmap-merge", {"node": "nope", "target": "b0", "bitmaps": ["b0"]},
     "Node 'nope' not found"),
    ("backup-unknown-source", "blockdev-backup", {**backup("t0"), "device": "nope"}, NOT_FOUND),
    ("backup-unknown-target", "blockdev-backup", backup("nope"), NOT_FOUND),
    ("cbw-unknown-file", "blockdev-add",
     {"driver": "copy-before-write", "node-name": "cbw", "file": "nope", "target": "t0"}, NOT_FOUND),
    ("export-unknown-node", "block-export-add", {"type": "nbd", "id": "e0", "node-name": "nope"},
     "Cannot find device='' nor node-name='nope'"),
    ("backup-unknown-bitmap", "blockdev-backup", backup("t0", sync="bitmap", bitmap="nope"),
     "Bitmap 'nope' could not be found"),
    ("cbw-unknown-bitmap", "blockdev-add",
     {"driver": "copy-before-write", "node-name": "cbw", "file": "d0", "target": "t0",
      "bitmap": {"node": "d0", "name": "nope"}}, "Dirty bitmap 'nope' not found"),
    ("bitmap-remove-unknown", "block-dirty-bitmap-remove", {"node": "d0", "name": "nope"},
     "Dirty bitmap 'nope' not found"),
    ("bitmap-duplicate", "block-dirty-bitmap-add", {"node": "d0", "name": "b0"}, "Bitmap already exists: b0"),
    ("bitmap-duplicate-in-transaction", "transaction", {"actions": [
        {"type": "block-dirty-bitmap-add", "data": {"node": "d0", "name": "b1"}},
        {"type": "block-dirty-bitmap-add", "data": {"node": "d0", "name": "b1"}}]}, "Bitmap already exists: b1"),
    ("read-only-bitmap-clear", "block-dirty-bitmap-clear", {"node": "ro", "name": "pb"},
     "Bitmap 'pb' is readonly and cannot be modified"),
    ("read-only-bitmap-remove", "block-dirty-bitmap-remove", {"node": "ro", "name": "pb"},
     "Bitmap 'pb' is readonly and cannot be modified"),
    ("read-only-bitmap-in-transaction", "transaction", {"actions": [
        {"type": "block-dirty-bitmap-add", "data": {"node": "ro", "name": "b9"}},
        {"type": "block-dirty-bitmap-clear", "data": {"node": "ro", "name": "pb"}}]},
     "Bitmap 'pb' is readonly and cannot be modified"),
    ("backup-too-small-target", "blockdev-backup", backup("small"), "Source and target image have different sizes"),
    ("backup-too-small-in-transaction", "transaction", {"actions": [
        {"type": "block-dirty-bitmap-add", "data": {"node": "d0", "name": "b4"}},
        {"type": "blockdev-backup", "data": backup("small")}]}, "Source and target image have different sizes"),
    ("backup-read-only-target", "blockdev-backup", backup("ro"), "Could not create node: Block node is read-only"),
    ("backup-same-node", "blockdev-backup", backup("d0"), "Source and target cannot be the same"),
    ("backup-negative-speed", "blockdev-backup", backup("t0", speed=-1),
     "Parameter 'speed' expects a non-negative value"),
    ("backup-bitmap-sync-without-bitmap", "blockdev-backup", backup("t0", sync="bitmap"),
     "must provide a valid bitmap name for 'bitmap' sync mode"),
    ("backup-bitmap-without-mode", "blockdev-backup", backup("t0", bitmap="b0"),
     "Bitmap sync mode must be given when providing a bitmap"),
    ("backup-bad-job-id", "blockdev-backup", backup("t0", **{"job-id": "1bad"}), "Invalid job ID '1bad'"),
]


@pytest.mark.parametrize("name,command,args,message", CASES, ids=[c[0] for c in CASES])
def test_refused_with_qemus_message_and_nothing_changed(vm: Vm, name: str, command: str, args: dict[str, Any],
                                                        message: str) -> None:
    before = vm.state()
    reply = vm.qmp.cmd_raw(command, args)
    assert "error" in reply, f"{command} {args} succeeded: {reply}"
    assert (reply["error"]["class"], reply["error"]["desc"]) == ("GenericError", message)
    assert vm.state() == before


def test_one_failing_case_does_not_spoil_the_next(vm: Vm) -> None:
    """After all the refusals, the same VM still takes a valid backup job (the names j0 and b1/b4 are free)."""
    for _, command, args, _ in CASES:
        vm.qmp.cmd_raw(command, args)
    vm.ok("transaction", {"actions": [
        {"type": "block-dirty-bitmap-add", "data": {"node": "d0", "name": "b4"}},
        {"type": "blockdev-backup", "data": backup("t0")}]})
    deadline = time.monotonic() + 60
    while True:
        event = vm.qmp.pull_event(wait=float(max(deadline - time.monotonic(), 0.1)))
        if event is not None and event["event"] == "BLOCK_JOB_COMPLETED":
            assert event["data"]["device"] == "j0" and "error" not in event["data"], event
            break
    (d0,) = [n for n in vm.ok("query-named-block-nodes") if n["node-name"] == "d0"]
    assert sorted(b["name"] for b in d0["dirty-bitmaps"]) == ["b0", "b4"]


def test_read_only_image_bitmap_may_be_disabled(vm: Vm) -> None:
    """QEMU 7.2 lets a bitmap loaded read-only be disabled (its check allows read-only for enable/disable);
    only changes to its bits or its removal are refused."""
    vm.ok("block-dirty-bitmap-disable", {"node": "ro", "name": "pb"})


def test_persistent_bitmap_on_a_read_only_node(vm: Vm, request: pytest.FixtureRequest) -> None:
    """pyemu refuses a persistent bitmap it could never store; QEMU 7.2 accepts it (measured) and fails only
    when it tries to store it. A non-persistent one is fine on both."""
    vm.ok("block-dirty-bitmap-add", {"node": "ro", "name": "mem"})
    before = vm.state()
    reply = vm.qmp.cmd_raw("block-dirty-bitmap-add", {"node": "ro", "name": "disk", "persistent": True})
    if "[qemu]" in request.node.name:
        assert "return" in reply, reply
        return
    assert reply["error"] == {"class": "GenericError", "desc": "Can't make bitmap 'disk' persistent in 'ro': "
                                                               "the image is opened read-only"}
    assert vm.state() == before
