"""pyemu driven over QMP by QEMU's own client library (qemu.qmp), plus raw sockets for bad clients."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from typing import Any

import pytest

qmp = pytest.importorskip("qemu.qmp")
from qemu.qmp import ExecuteError, QMPClient  # noqa: E402

from pyemu.system.iothread import default_poll_max_ns  # noqa: E402

TIMEOUT = 30.0


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT * 2))


async def connect(path: str, name: str = "test") -> QMPClient:
    client = QMPClient(name)
    await asyncio.wait_for(client.connect(path), TIMEOUT)
    return client


async def execute(client: QMPClient, command: str, arguments: dict[str, Any] | None = None) -> Any:
    return await asyncio.wait_for(client.execute(command, arguments), TIMEOUT)


async def next_event(client: QMPClient, name: str) -> dict[str, Any]:
    while True:
        event = await asyncio.wait_for(client.events.get(), TIMEOUT)
        if event["event"] == name:
            return dict(event)


async def disconnect_after_quit(client: QMPClient) -> None:
    """After ``quit`` the server hangs up; qemu.qmp reports that as EOFError from disconnect()
    when its reader saw the end first (documented behaviour of the client, not an error here)."""
    try:
        await client.disconnect()
    except EOFError:
        pass


async def quit_and_disconnect(client: QMPClient) -> None:
    assert await execute(client, "quit") == {}
    await disconnect_after_quit(client)


class RawClient:
    """A plain socket speaking QMP by hand: for garbage, partial writes and rude disconnects."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(path)
        self.buffer = b""

    def message(self) -> dict[str, Any]:
        while b"\n" not in self.buffer:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("server closed the connection")
            self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\n")
        return json.loads(line)

    def reply(self) -> dict[str, Any]:
        """The next message that is not an event."""
        while True:
            message = self.message()
            if "event" not in message:
                return message

    def reply_to(self, ident: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """The replies before the one carrying ``id`` ``ident``, and that one."""
        before: list[dict[str, Any]] = []
        while True:
            message = self.reply()
            if message.get("id") == ident:
                return before, message
            before.append(message)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        self.sock.close()


def qmp_args(path: str) -> list[str]:
    return ["-qmp", f"unix:{path},server=on,wait=off"]


def test_status_transitions_with_events(launch, short_dir):
    path = str(short_dir / "qmp.sock")
    vm = launch(["-S", *qmp_args(path), "-name", "guest=spinner", "-uuid",
                 "0b5a3c3e-6f3b-4f0e-9d53-0123456789ab"], [path])

    async def scenario() -> None:
        client = await connect(path)
        version = client.greeting.QMP.version
        assert version["qemu"] == {"major": 7, "minor": 2, "micro": 0}
        assert (await execute(client, "query-status"))["status"] == "prelaunch"
        assert await execute(client, "stop") == {}  # no-op in prelaunch, as QEMU
        assert await execute(client, "system_reset") == {}
        assert (await next_event(client, "RESET"))["data"]["reason"] == "host-qmp-system-reset"
        assert (await execute(client, "query-status"))["status"] == "prelaunch"
        assert await execute(client, "cont") == {}
        await next_event(client, "RESUME")
        assert await execute(client, "query-status") == {"status": "running", "running": True,
                                                         "singlestep": False}
        assert await execute(client, "stop") == {}
        stop = await next_event(client, "STOP")
        assert set(stop["timestamp"]) == {"seconds", "microseconds"}
        assert (await execute(client, "query-status"))["status"] == "paused"
        assert await execute(client, "cont") == {}
        await next_event(client, "RESUME")
        assert (await execute(client, "query-status"))["running"] is True
        assert await execute(client, "query-name") == {"name": "spinner"}
        assert await execute(client, "query-uuid") == {"UUID": "0b5a3c3e-6f3b-4f0e-9d53-0123456789ab"}
        assert (await execute(client, "query-kvm"))["enabled"] is False
        (cpu,) = await execute(client, "query-cpus-fast")
        assert cpu["cpu-index"] == 0 and cpu["target"] == "x86_64" and cpu["thread-id"] > 0
        assert (await execute(client, "query-version"))["package"].startswith("pyemu")
        await quit_and_disconnect(client)

    run(scenario())
    assert vm.wait() == 0


def test_qemu_error_classes(launch, short_dir):
    path = str(short_dir / "qmp.sock")
    vm = launch(["-S", *qmp_args(path)], [path])

    async def scenario() -> None:
        client = await connect(path)
        with pytest.raises(ExecuteError) as info:
            await execute(client, "no-such-command")
        assert info.value.error_class == "CommandNotFound"
        assert info.value.error.error.desc == "The command no-such-command has not been found"
        with pytest.raises(ExecuteError) as info:
            await execute(client, "stop", {"force": True})
        assert (info.value.error_class, info.value.error.error.desc) == ("GenericError", "Parameter 'force' is unexpected")
        with pytest.raises(ExecuteError) as info:
            await execute(client, "qmp_capabilities")
        assert info.value.error_class == "CommandNotFound"
        await quit_and_disconnect(client)

    run(scenario())
    assert vm.wait() == 0


def test_two_clients_see_each_others_effects(launch, short_dir):
    first_path, second_path = str(short_dir / "a.sock"), str(short_dir / "b.sock")
    vm = launch([*qmp_args(first_path), *qmp_args(second_path)], [first_path, second_path])

    async def scenario() -> None:
        first = await connect(first_path, "first")
        second = await connect(second_path, "second")
        third = await connect(first_path, "third")  # a second client on the same socket
        assert (await execute(second, "query-status"))["status"] == "running"
        await execute(first, "stop")
        for client in (first, second, third):
            await next_event(client, "STOP")
            assert (await execute(client, "query-status"))["status"] == "paused"
        await execute(second, "cont")
        await next_event(third, "RESUME")
        await third.disconnect()
        await second.disconnect()
        await quit_and_disconnect(first)

    run(scenario())
    assert vm.wait() == 0


def test_bad_raw_clients_do_not_hurt_the_vm(launch, short_dir):
    path = str(short_dir / "qmp.sock")
    vm = launch(qmp_args(path), [path])

    rude = RawClient(path)
    assert "QMP" in rude.message()
    rude.send(b'{"execute": "query-status"}\n')  # before negotiation
    assert rude.reply()["error"]["class"] == "CommandNotFound"
    rude.send(b'{"execute": "qmp_capabilities"}\n')
    assert rude.reply() == {"return": {}}
    rude.send(b'this is not json\n\xff\xfe\n{"execute": "query-status", "id": "after-garbage"}')
    errors, answer = rude.reply_to("after-garbage")
    assert errors and all(e["error"]["desc"].startswith("JSON parse error") for e in errors)
    assert answer["return"]["status"] == "running"
    rude.send(b'{"execute": "query-sta')  # partial ...
    rude.send(b'tus", "id": "split"}')  # ... and the rest
    assert rude.reply() == {"return": {"status": "running", "running": True, "singlestep": False}, "id": "split"}
    rude.send(b'{"execute": "stop"}{"execute": "cont"}{"execute": "query-status", "arguments": {"x": ')
    rude.close()  # mid-command: replies pending, a request half sent

    huge = RawClient(path)
    huge.message()
    huge.send(b'{"execute": "qmp_capabilities"}\n')
    assert huge.reply() == {"return": {}}
    with pytest.raises((EOFError, ConnectionError)):
        huge.send(b'{"execute": "query-status", "arguments": {"x": "' + b"a" * (2 << 20))
        while True:
            huge.reply()  # the error, then the end of the connection
    huge.close()

    async def scenario() -> None:
        client = await connect(path)
        assert (await execute(client, "query-status"))["status"] == "running"
        await quit_and_disconnect(client)

    run(scenario())
    assert vm.wait() == 0


def test_introspection_and_qmp_shell(launch, short_dir):
    path = str(short_dir / "qmp.sock")
    vm = launch(["-S", *qmp_args(path), *qmp_args(path + "2")], [path, path + "2"])

    async def scenario() -> None:
        client = await connect(path)
        info = await execute(client, "query-qmp-schema")
        names = {entry["name"] for entry in info if entry["meta-type"] == "command"}
        assert {"query-status", "stop", "cont", "quit", "query-qmp-schema"} <= names
        commands = await execute(client, "query-commands")
        assert {c["name"] for c in commands} == names
        await client.disconnect()

    run(scenario())
    shell = subprocess.run([sys.executable, "-m", "qemu.qmp.qmp_shell", path + "2"],
                           input="query-status\nquery-name\nquit\n", capture_output=True, text=True,
                           timeout=TIMEOUT)
    assert '"status": "prelaunch"' in shell.stdout, shell.stdout + shell.stderr
    assert vm.wait() == 0


def test_libvirt_chardev_mon_spelling_and_reset(launch, short_dir):
    path = str(short_dir / "mon.sock")
    vm = launch(["-nodefaults", "-no-user-config", "-display", "none",
                 "-chardev", f"socket,id=charmonitor,path={path},server=on,wait=off",
                 "-mon", "chardev=charmonitor,id=monitor,mode=control"], [path])

    async def scenario() -> None:
        client = await connect(path)
        assert (await execute(client, "query-status"))["status"] == "running"
        assert await execute(client, "system_reset") == {}
        reset = await next_event(client, "RESET")
        assert reset["data"] == {"guest": False, "reason": "host-qmp-system-reset"}
        # The board pauses the vCPUs around a reset and the run state shows it for a moment.
        while (await execute(client, "query-status"))["status"] != "running":
            await asyncio.sleep(0.05)
        # The power button: POWERDOWN; this guest ignores it and keeps running, as under QEMU.
        assert await execute(client, "system_powerdown") == {}
        await next_event(client, "POWERDOWN")
        assert (await execute(client, "query-status"))["status"] == "running"
        assert await execute(client, "quit") == {}
        shutdown = await next_event(client, "SHUTDOWN")
        assert shutdown["data"] == {"guest": False, "reason": "host-qmp-quit"}
        await disconnect_after_quit(client)

    run(scenario())
    assert vm.wait() == 0


def test_tcp_monitor(launch, short_dir):
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    marker = str(short_dir / "unix.sock")  # something to wait for: the tcp listener opens just before it
    vm = launch(["-qmp", f"tcp:127.0.0.1:{port},server=on,wait=off", *qmp_args(marker)], [marker])

    async def scenario() -> None:
        client = QMPClient("tcp")
        await asyncio.wait_for(client.connect(("127.0.0.1", port)), TIMEOUT)
        assert (await execute(client, "query-status"))["status"] == "running"
        await quit_and_disconnect(client)

    run(scenario())
    assert vm.wait() == 0


@pytest.mark.parametrize("argv,fragment", [
    (["-qmp", "unix:/tmp/x.sock"], "Failed to connect to '/tmp/x.sock'"),  # server=off: a client, as in QEMU
    (["-qmp", "file:/tmp/x"], "a monitor needs a socket"),
    (["-mon", "chardev=nope,mode=control"], "chardev 'nope' not found"),
    (["-chardev", "null,id=c", "-mon", "chardev=c,mode=foo"], "does not accept value 'foo'"),
    (["-chardev", "socket,id=c,path=/tmp/c.sock,server=on,wait=off", "-mon", "chardev=c,mode=control",
      "-device", "virtio-serial-device", "-device", "virtconsole,chardev=c"], "already in use"),
    (["-uuid", "not-a-uuid"], "failed to parse UUID"),
    (["-display", "gtk"], "only -display none"),
    (["-name", "x,colour=blue"], "Invalid parameter 'colour'"),
    (["-qmp", "stdio"], "cannot use stdio by multiple character devices"),
])
def test_bad_monitor_options_are_one_line(argv, fragment):
    result = subprocess.run([sys.executable, "-m", "pyemu.system.main", *argv], capture_output=True, text=True,
                            timeout=TIMEOUT)
    assert result.returncode == 1
    assert fragment in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_guest_shutdown_is_reported_with_guest_true(launch, short_dir, spin_kernel):
    """A guest that writes isa-debug-exit ends the VM: clients see SHUTDOWN with guest=true."""
    from pyemu.target.x86.boot.synthetic import make_multiboot_binary

    spin_kernel.write_bytes(make_multiboot_binary(b"\xb0\x00\xe6\xf4\xeb\xfe"))  # mov al,0; out 0xf4,al; jmp $
    path = str(short_dir / "qmp.sock")
    vm = launch(["-S", "-device", "isa-debug-exit,iobase=0xf4,iosize=4", *qmp_args(path)], [path])

    async def scenario() -> None:
        client = await connect(path)
        await execute(client, "cont")
        shutdown = await next_event(client, "SHUTDOWN")
        assert shutdown["data"] == {"guest": True, "reason": "guest-shutdown"}
        await disconnect_after_quit(client)

    run(scenario())
    assert vm.wait() == 1  # isa-debug-exit: (0 << 1) | 1


def test_no_shutdown_keeps_the_vm_until_reset_or_quit(launch, short_dir, spin_kernel):
    """-no-shutdown: the guest's ACPI power-off (S5 through the GED) stops the VM in state shutdown; cont is
    refused, system_reset leaves it in prelaunch and cont runs it again (the guest powers off again), quit ends
    pyemu with status 0."""
    from pyemu.machines.memmap import GED_BASE
    from pyemu.target.x86.boot.synthetic import make_multiboot_binary

    # mov byte [GED_BASE + 4], SLP_EN | (5 << 2); jmp $
    spin_kernel.write_bytes(make_multiboot_binary(b"\xc6\x05" + (GED_BASE + 4).to_bytes(4, "little") +
                                                  b"\x34\xeb\xfe"))
    path = str(short_dir / "qmp.sock")
    vm = launch(["-S", "-no-shutdown", *qmp_args(path)], [path])

    async def scenario() -> None:
        client = await connect(path)
        await execute(client, "cont")
        shutdown = await next_event(client, "SHUTDOWN")
        assert shutdown["data"] == {"guest": True, "reason": "guest-shutdown"}
        assert (await execute(client, "query-status"))["status"] == "shutdown"
        assert vm.proc.poll() is None  # still there
        with pytest.raises(ExecuteError) as error:
            await execute(client, "cont")
        assert "Resetting the Virtual Machine is required" in str(error.value)
        assert await execute(client, "system_reset") == {}
        await next_event(client, "RESET")
        assert (await execute(client, "query-status"))["status"] == "prelaunch"  # QEMU waits for cont too
        await execute(client, "cont")
        second = await next_event(client, "SHUTDOWN")  # the guest ran again and powered off again
        assert second["data"]["guest"] is True
        await quit_and_disconnect(client)

    run(scenario())
    assert vm.wait() == 0


def test_query_block_lists_drives_and_their_chains(launch, short_dir):
    base, top = short_dir / "base.qcow2", short_dir / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "4M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(top)],
                   check=True)
    path = str(short_dir / "qmp.sock")
    vm = launch(["-drive", f"file={top},format=qcow2,if=none,id=disk0",
                 "-device", "virtio-blk-device,drive=disk0,id=blk0", *qmp_args(path)], [path])

    async def scenario() -> None:
        client = await connect(path)
        (info,) = await execute(client, "query-block")
        assert (info["device"], info["qdev"], info["removable"]) == ("disk0", "blk0", False)
        inserted = info["inserted"]
        assert inserted["drv"] == "qcow2" and inserted["file"] == str(top) and inserted["ro"] is False
        assert inserted["backing_file_depth"] == 1 and inserted["backing_file"].endswith("base.qcow2")
        assert inserted["cache"] == {"writeback": True, "direct": False, "no-flush": False}
        image = inserted["image"]
        assert image["virtual-size"] == 4 << 20 and image["backing-filename"] == "base.qcow2"
        assert image["backing-image"]["format"] == "qcow2"
        (thread,) = await execute(client, "query-iothreads")  # the default I/O thread serves the disk
        assert thread["id"] == "main-loop" and thread["thread-id"] > 0
        assert (thread["poll-max-ns"], thread["poll-grow"], thread["poll-shrink"]) == (default_poll_max_ns(), 0, 0)
        (machine,) = await execute(client, "query-machines")
        assert machine["name"] == "microvm" and machine["cpu-max"] >= 1
        await quit_and_disconnect(client)

    run(scenario())
    assert vm.wait() == 0
