"""Migration over QEMU's socket URIs (``tcp:`` and ``unix:``) between two in-process VMs running the
counting guest, ``migrate_cancel``, the parameters and capabilities commands and their HMP forms, and
bad URIs with QEMU 7.2's messages."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import pyemu
from pyemu.errors import ConfigError
from pyemu.migration.errors import TransportError
from pyemu.migration.params import MigrationCancelled, MigrationParameters, RateLimiter
from pyemu.migration.transport import IncomingStream
from pyemu.system.runstate import RunState

from migration_programs import write_counter_kernel
from test_migration_guest import BASE, TIMEOUT, counter, stop_vm, wait_counting, wait_migration


def manager(vm: pyemu.VM) -> Any:
    return vm._instance.control.migration


def hmp(vm: pyemu.VM, line: str) -> str:
    return str(vm.execute("human-monitor-command", {"command-line": line})).replace("\r\n", "\n")


@pytest.fixture
def kernel(short_dir: Path) -> Path:
    return write_counter_kernel(short_dir)


def migrate_counter(kernel: Path, dest_uri: str) -> None:
    """Source counts, migrates live to a destination listening on ``dest_uri``; the destination goes on
    from the exact value the source stopped at (no gap, no repeat: the guest checks counter == EBX)."""
    dest = pyemu.VM("-kernel", str(kernel), *BASE, "-incoming", dest_uri)
    dest.start()
    source = pyemu.VM("-kernel", str(kernel), *BASE)
    try:
        assert dest.state is RunState.INMIGRATE
        address = manager(dest).incoming_address
        # QEMU 7.2: a listening destination reports where it listens and no status; its monitor is served.
        if dest_uri.startswith("tcp:"):
            assert dest.execute("query-migrate") == {"socket-address": [
                {"type": "inet", "host": "127.0.0.1", "port": str(address[1]), "ipv4": True}]}
        else:
            assert dest.execute("query-migrate") == {"socket-address": [{"type": "unix", "path": dest_uri[5:]}]}
        uri = f"tcp:127.0.0.1:{address[1]}" if dest_uri.startswith("tcp:") else dest_uri
        source.start()
        wait_counting(source, 50_000)
        source.execute("migrate", {"uri": uri})
        info = wait_migration(source)
        assert info["status"] == "completed", info
        assert source.state is RunState.POSTMIGRATE
        frozen = counter(source)
        end = wait_migration(dest)
        assert end == {"status": "completed"}, end
        assert dest.state is RunState.RUNNING
        machine = dest._instance.machine
        dest.pause()
        assert counter(dest) >= frozen
        assert machine.vcpus[0].save_state().regs["rbx"] == counter(dest)
        dest.resume()
        wait_counting(dest, frozen + 100_000)
        if dest_uri.startswith("unix:"):
            assert not Path(dest_uri[5:]).exists()  # the listening socket is gone once connected
    finally:
        assert stop_vm(source) == 0
        assert stop_vm(dest) == 0  # 0xab would mean the guest saw a gap or repeat


def test_tcp_migration_counter_continues(kernel: Path) -> None:
    migrate_counter(kernel, "tcp:127.0.0.1:0")


def test_unix_migration_counter_continues(kernel: Path, short_dir: Path) -> None:
    migrate_counter(kernel, f"unix:{short_dir}/mig.sock")


def test_migrate_incoming_deferred_over_unix(kernel: Path, short_dir: Path) -> None:
    path = short_dir / "defer.sock"
    dest = pyemu.VM("-kernel", str(kernel), *BASE, "-incoming", "defer")
    dest.start()
    source = pyemu.VM("-kernel", str(kernel), *BASE)
    source.start()
    try:
        dest.execute("migrate-incoming", {"uri": f"unix:{path}"})
        assert path.exists()
        wait_counting(source, 10_000)
        source.execute("migrate", {"uri": f"unix:{path}"})
        assert wait_migration(source)["status"] == "completed"
        assert wait_migration(dest) == {"status": "completed"}
        wait_counting(dest, counter(source) + 10_000)
    finally:
        assert stop_vm(source) == 0
        assert stop_vm(dest) == 0


def test_cancel_leaves_the_source_running_and_the_destination_gives_up(kernel: Path) -> None:
    dest = pyemu.VM("-kernel", str(kernel), *BASE, "-incoming", "tcp:127.0.0.1:0")
    dest.start()
    source = pyemu.VM("-kernel", str(kernel), *BASE)
    source.start()
    try:
        port = manager(dest).incoming_address[1]
        wait_counting(source, 10_000)
        source.execute("migrate-set-parameters", {"max-bandwidth": 2000})  # bytes/s: the save takes minutes
        source.execute("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
        source.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        deadline = time.monotonic() + TIMEOUT
        while source.execute("query-migrate")["status"] != "active":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        source.events.drain()
        source.execute("migrate_cancel")
        info = wait_migration_end(source)
        assert info["status"] == "cancelled", info
        statuses = [e.data["status"] for e in source.events.drain() if e.name == "MIGRATION"]
        assert statuses == ["cancelling", "cancelled"]
        assert source.state is RunState.RUNNING
        wait_counting(source, counter(source) + 10_000)  # the source keeps running
        end = wait_migration(dest)
        assert end["status"] == "failed" and "ends inside" in end["error-desc"], end
        assert dest.state is RunState.INMIGRATE  # nothing half-loaded can run
        source.execute("migrate_cancel")  # nothing to cancel: no error, as QEMU
        assert hmp(source, "migrate_cancel") == ""
    finally:
        assert stop_vm(source) == 0
        stop_vm(dest)


def wait_migration_end(vm: pyemu.VM) -> dict[str, Any]:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        info = vm.execute("query-migrate")
        if info.get("status") in ("completed", "failed", "cancelled"):
            return info
        time.sleep(0.02)
    raise AssertionError(f"migration did not end: {info}")


def test_migration_events_only_with_the_events_capability(kernel: Path, short_dir: Path) -> None:
    """QEMU 7.2 sends MIGRATION events only when the 'events' capability is on (off by default)."""
    vm = pyemu.VM("-kernel", str(kernel), *BASE, "-S")
    vm.start()
    try:
        vm.execute("migrate", {"uri": f"file:{short_dir / 'a.state'}"})
        assert wait_migration_end(vm)["status"] == "completed"
        assert [e.name for e in vm.events.drain() if e.name == "MIGRATION"] == []
        vm.execute("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
        vm.execute("migrate", {"uri": f"file:{short_dir / 'b.state'}"})
        assert wait_migration_end(vm)["status"] == "completed"
        assert [e.data["status"] for e in vm.events.drain() if e.name == "MIGRATION"] == [
            "setup", "active", "completed"]
    finally:
        stop_vm(vm)


def test_connect_errors_are_qemus(kernel: Path, short_dir: Path) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()  # nobody listens there now
    vm = pyemu.VM("-kernel", str(kernel), *BASE, "-S")
    vm.start()
    try:
        vm.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        info = wait_migration_end(vm)
        assert info["error-desc"] == f"Failed to connect to '127.0.0.1:{port}': Connection refused"
        vm.execute("migrate", {"uri": f"unix:{short_dir}/none/x"})
        assert wait_migration_end(vm)["error-desc"] == (
            f"Failed to connect to '{short_dir}/none/x': No such file or directory")
        for uri, message in (("tcp:localhost", "error parsing address 'localhost'"),
                             ("tcp:", "error parsing address ''"),
                             ("unix:", "invalid Unix socket address"),
                             ("bogus:x", "unknown migration protocol: bogus:x")):
            with pytest.raises(pyemu.CommandError) as info_:
                vm.execute("migrate", {"uri": uri})
            assert message in str(info_.value)
        vm.execute("migrate", {"uri": "tcp:localhost:abc"})
        assert wait_migration_end(vm)["error-desc"].startswith("address resolution failed for localhost:abc")
        assert vm.state is RunState.PRELAUNCH
    finally:
        stop_vm(vm)


def test_bad_incoming_uris(kernel: Path) -> None:
    with pytest.raises(ConfigError, match="error parsing address 'x'"):
        pyemu.VM("-kernel", str(kernel), *BASE, "-incoming", "tcp:x")
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        with pytest.raises(TransportError, match="Failed to bind socket to '127.0.0.1:.*': Address already in use"):
            IncomingStream(f"tcp:127.0.0.1:{busy.getsockname()[1]}")
    finally:
        busy.close()


def test_parameters_round_trip_and_refusals(kernel: Path) -> None:
    vm = pyemu.VM("-kernel", str(kernel), *BASE, "-S")
    vm.start()
    try:
        params = vm.execute("query-migrate-parameters")
        assert params["downtime-limit"] == 300 and params["max-bandwidth"] == 134217728
        assert params["multifd-channels"] == 2 and params["tls-creds"] == ""
        vm.execute("migrate-set-parameters", {"downtime-limit": 50, "max-bandwidth": 1 << 20,
                                              "multifd-channels": 4, "tls-creds": "x"})
        params = vm.execute("query-migrate-parameters")
        assert (params["downtime-limit"], params["max-bandwidth"], params["multifd-channels"],
                params["tls-creds"]) == (50, 1 << 20, 4, "x")
        for args, message in (({"downtime-limit": 2000001}, "Parameter 'downtime_limit' expects an integer in "
                                                             "the range of 0 to (2000 * 1000) ms"),
                              ({"downtime-limit": -1}, "Parameter 'downtime_limit' expects"),
                              ({"max-bandwidth": 1, "multifd-channels": 0},
                               "Parameter 'multifd_channels' expects a value between 1 and 255"),
                              ({"bogus": 1}, "Parameter 'bogus' is unexpected")):
            with pytest.raises(pyemu.CommandError) as info:
                vm.execute("migrate-set-parameters", args)
            assert message in str(info.value)
        assert vm.execute("query-migrate-parameters")["max-bandwidth"] == 1 << 20  # nothing half-applied
        vm.execute("migrate-set-parameters", {"max-bandwidth": -1})
        assert vm.execute("query-migrate-parameters")["max-bandwidth"] == (1 << 64) - 1  # QEMU's uint64
        # HMP forms
        assert hmp(vm, "migrate_set_parameter max-bandwidth 10M") == ""
        assert hmp(vm, "migrate_set_parameter downtime-limit 5000000").startswith(
            "Error: Parameter 'downtime_limit' expects an integer")
        assert hmp(vm, "migrate_set_parameter bogus 1") == "Error: invalid parameter value: bogus\n"
        text = hmp(vm, "info migrate_parameters")
        assert "max-bandwidth: 10485760 bytes/second\n" in text and "downtime-limit: 50 ms\n" in text
        assert "tls-creds: 'x'\n" in text and "compress-wait-thread: on\n" in text
        # capabilities
        caps = vm.execute("query-migrate-capabilities")
        assert [c["capability"] for c in caps][:3] == ["xbzrle", "rdma-pin-all", "auto-converge"]
        assert not any(c["state"] for c in caps)
        vm.execute("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
        assert {c["capability"]: c["state"] for c in vm.execute("query-migrate-capabilities")}["events"]
        with pytest.raises(pyemu.CommandError, match="Capability 'postcopy-ram' is not supported"):
            vm.execute("migrate-set-capabilities",
                       {"capabilities": [{"capability": "postcopy-ram", "state": True}]})
        with pytest.raises(pyemu.CommandError, match="'capability' does not accept value 'bogus'|bogus"):
            vm.execute("migrate-set-capabilities", {"capabilities": [{"capability": "bogus", "state": True}]})
    finally:
        stop_vm(vm)


def test_rate_limiter_honours_max_bandwidth_and_cancel() -> None:
    class Sink:
        def __init__(self) -> None:
            self.data = bytearray()

        def write(self, data: bytes, /) -> int:
            self.data += data
            return len(data)

    params = MigrationParameters()
    params.set({"max-bandwidth": 100_000})
    cancel = threading.Event()
    sink = Sink()
    limiter = RateLimiter(sink, params, cancel)
    start = time.monotonic()
    limiter.write(bytes(150_000))
    assert time.monotonic() - start >= 0.4  # 150 kB at 100 kB/s cannot take less than a slice-rounded 0.5 s
    assert len(sink.data) == 150_000
    params.set({"max-bandwidth": 10})
    threading.Timer(0.2, cancel.set).start()
    with pytest.raises(MigrationCancelled):
        limiter.write(bytes(10_000))


def test_a_quit_destination_stops_listening(kernel: Path, short_dir: Path) -> None:
    path = short_dir / "gone.sock"
    dest = pyemu.VM("-kernel", str(kernel), *BASE, "-incoming", f"unix:{path}")
    dest.start()
    assert path.exists()
    stop_vm(dest)
    deadline = time.monotonic() + TIMEOUT
    while path.exists():  # the listener polls for the quit every 0.2 s
        assert time.monotonic() < deadline, "the destination kept listening after quit"
        time.sleep(0.05)
    with pytest.raises(OSError):
        client = socket.socket(socket.AF_UNIX)
        try:
            client.connect(str(path))
        finally:
            client.close()
