"""A destination whose incoming load fails ends as QEMU 7.2's qemu-system does: the reason and "load of
migration failed: Invalid argument" on stderr, exit status 1 (measured: ``-incoming tcp:`` fed a
stream that is not one, and ``-incoming defer`` + QMP ``migrate-incoming`` of a bad stream, both exit 1).
The pyemu command only: an embedded :class:`pyemu.VM` stays in ``inmigrate`` for its owner to inspect."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

from migration_programs import write_counter_kernel

TIMEOUT = 60.0


def free_port() -> int:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = int(probe.getsockname()[1])
    probe.close()
    return port


def pyemu_process(kernel: Path, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "pyemu.system.main", "-kernel", str(kernel), "-m", "32",
                             "-accel", "tcg", "-serial", "none", *extra],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def connect_when_listening(address: tuple[str, int] | str, proc: subprocess.Popen[bytes]) -> socket.socket:
    deadline = time.monotonic() + TIMEOUT
    while True:
        assert proc.poll() is None, proc.communicate()
        try:
            if isinstance(address, str):
                sock = socket.socket(socket.AF_UNIX)
                sock.connect(address)
                return sock
            return socket.create_connection(address)
        except OSError:
            assert time.monotonic() < deadline, "the destination does not listen"
            time.sleep(0.1)


def finish(proc: subprocess.Popen[bytes]) -> tuple[int, str]:
    try:
        _out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError("the destination did not exit after its load failed") from None
    return proc.returncode, err.decode(errors="replace")


def test_tcp_destination_fed_a_bad_stream_exits_1(short_dir: Path) -> None:
    kernel = write_counter_kernel(short_dir)
    port = free_port()
    proc = pyemu_process(kernel, "-incoming", f"tcp:127.0.0.1:{port}")
    try:
        sock = connect_when_listening(("127.0.0.1", port), proc)
        sock.sendall(b"QEVM\x00\x00\x00\x03" + b"\x02" * 64)  # QEMU's magic: not a pyemu stream
        sock.close()
        status, err = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert status == 1, err
    assert "load of migration failed: Invalid argument" in err, err
    assert "Traceback" not in err, err


def test_deferred_migrate_incoming_of_a_bad_file_exits_1(short_dir: Path) -> None:
    kernel = write_counter_kernel(short_dir)
    bad = short_dir / "bad.state"
    bad.write_bytes(b"PYEMU-VM\x01\x00\x00\x00" + b"\x02" * 64)
    qmp_path = str(short_dir / "qmp.sock")
    proc = pyemu_process(kernel, "-incoming", "defer", "-qmp", f"unix:{qmp_path},server=on,wait=off")
    try:
        sock = connect_when_listening(qmp_path, proc)
        stream = sock.makefile("rw")
        assert "QMP" in json.loads(stream.readline())
        for command, args in (("qmp_capabilities", {}), ("migrate-incoming", {"uri": f"file:{bad}"})):
            stream.write(json.dumps({"execute": command, "arguments": args}) + "\n")
            stream.flush()
            while True:
                reply = json.loads(stream.readline())
                if "return" in reply or "error" in reply:
                    break
            assert "return" in reply, reply
        status, err = finish(proc)
        sock.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert status == 1, err
    assert "load of migration failed: Invalid argument" in err and "section" in err, err


def test_startup_incoming_of_a_bad_file_or_command_exits_1_as_qemu(short_dir: Path) -> None:
    """``-incoming exec:`` (and pyemu's ``file:``) load before the VM starts: the reason, then QEMU's
    "load of migration failed: Invalid argument" line (measured on qemu-system-x86_64 7.2 with
    ``-incoming "exec:cat garbage"``: "Not a migration stream" + that line, exit 1)."""
    kernel = write_counter_kernel(short_dir)
    garbage = short_dir / "garbage.bin"
    garbage.write_bytes(b"not a stream" * 100)
    for uri in (f"exec:cat {garbage}", f"file:{garbage}"):
        proc = pyemu_process(kernel, "-incoming", uri)
        status, err = finish(proc)
        assert status == 1, err
        assert err.splitlines() == ["pyemu: not a pyemu VM-state stream (bad magic)",
                                    "pyemu: load of migration failed: Invalid argument"], err
