"""The guest-level boot profiler: symbol lookup, sample classification, the vCPU sampler, and the GDB
remote-protocol framing the QEMU side uses (accel/tcg/guest_profile.py, benchmarks/guest_profile.py)."""

from __future__ import annotations

import importlib.util
import socket
import sys
import threading
from pathlib import Path
from types import ModuleType

import pytest

from pyemu.accel.tcg.guest_profile import (
    BEFORE_KERNEL,
    ENGINE,
    IDLE,
    USER_SPACE,
    KernelSymbols,
    Profile,
    Sample,
    VcpuSampler,
    bucket_seconds,
    classify,
    host_location,
    summarise,
)

KALLSYMS = """\
ffffffff81000000 T startup_64
ffffffff81000100 t secondary_startup_64
ffffffff81001000 D some_data
ffffffff81002000 T memset_orig
ffffffff81002100 W weak_function
ffffffffc0000000 t module_fn\t[virtio_net]
"""


def load_benchmark() -> ModuleType:
    """benchmarks/guest_profile.py is a script beside boot.py, not a package module."""
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "guest_profile.py"
    spec = importlib.util.spec_from_file_location("bench_guest_profile", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kallsyms_text_symbols_and_lookup():
    symbols = KernelSymbols.from_kallsyms(KALLSYMS)
    assert len(symbols) == 4  # data and module symbols are left out
    assert symbols.lookup(0xFFFFFFFF81000000) == "startup_64"
    assert symbols.lookup(0xFFFFFFFF810000FF) == "startup_64"
    assert symbols.lookup(0xFFFFFFFF81001500) == "secondary_startup_64"  # D symbols do not split text
    assert symbols.lookup(0xFFFFFFFF81002150) == "weak_function"
    assert symbols.lookup(0x1000) is None


def test_classify_idle_boot_code_kernel_and_user():
    symbols = KernelSymbols.from_kallsyms(KALLSYMS)
    samples = [Sample(0.0, 0x100200, False),  # the decompressor, identity-mapped
               Sample(0.1, 0xFFFFFFFF81002010, False),
               Sample(0.2, 0xFFFFFFFF81002010, True),  # halted: idle whatever the RIP
               Sample(0.3, 0x401000, False),  # after the kernel ran: /init
               Sample(0.4, 0xFFFF888000001000, False)]  # kernel space without a symbol
    assert classify(samples, symbols) == [BEFORE_KERNEL, "memset_orig", IDLE, USER_SPACE,
                                          "[kernel address without a symbol]"]


def test_summarise_shares_and_seconds():
    symbols = KernelSymbols.from_kallsyms(KALLSYMS)
    samples = [Sample(i / 10, 0xFFFFFFFF81000010, False) for i in range(6)]
    samples += [Sample(0.6 + i / 10, 0, True) for i in range(2)]
    samples += [Sample(0.8, 0xFFFFFFFF81002000, False), Sample(0.85, 0xFFFFFFFF81002000, False)]
    summary = summarise(Profile(10.0, samples, wall_s=1.9), symbols, top=2)
    assert bucket_seconds(Profile(10.0, samples, wall_s=1.9), symbols) == pytest.approx(
        {"startup_64": 1.2, IDLE: 0.4, "memset_orig": 0.3})
    assert summary["samples"] == 10 and summary["idle_share"] == pytest.approx(0.2105, abs=1e-4)
    assert summary["top"] == [
        {"function": "startup_64", "samples": 6, "share": 0.6316, "seconds": 1.2},
        {"function": IDLE, "samples": 2, "share": 0.2105, "seconds": 0.4},
    ]


def test_late_samples_weigh_the_time_they_stood_for():
    """A sample taken 50 ms late (the sampler waited for the GIL) counts for those 50 ms."""
    symbols = KernelSymbols.from_kallsyms(KALLSYMS)
    samples = [Sample(i * 0.001, 0xFFFFFFFF81000000, False) for i in range(50)]
    samples.append(Sample(0.099, 0xFFFFFFFF81002000, False))
    seconds = bucket_seconds(Profile(1000.0, samples, wall_s=0.1), symbols)
    assert seconds["memset_orig"] == pytest.approx(0.05, rel=0.05)
    assert seconds["startup_64"] == pytest.approx(0.05, rel=0.05)


class FakeGate:
    def __init__(self) -> None:
        self.last_block = 0xFFFFFFFF81000000


class FakeVcpu:
    def __init__(self, index: int) -> None:
        self.index = index
        self._gate = FakeGate()
        self._halted = False


def test_sampler_reads_gate_and_halted_flag_of_each_vcpu():
    vcpus = [FakeVcpu(0), FakeVcpu(1)]
    vcpus[1]._halted = True
    sampler = VcpuSampler(lambda: vcpus, hz=2000.0)
    sampler.start()
    deadline = threading.Event()
    while len(sampler.per_vcpu.get(1, [])) < 5:
        deadline.wait(0.01)
    vcpus[0]._gate.last_block = 0xFFFFFFFF81002000
    seen = len(sampler.per_vcpu[0])
    while len(sampler.per_vcpu[0]) < seen + 5:
        deadline.wait(0.01)
    profile = sampler.stop()
    assert profile.samples is sampler.per_vcpu[0] and profile.wall_s > 0
    assert {s.rip for s in profile.samples} == {0xFFFFFFFF81000000, 0xFFFFFFFF81002000}
    assert not any(s.halted for s in profile.samples)
    assert all(s.halted for s in sampler.per_vcpu[1])
    times = [s.at for s in profile.samples]
    assert times == sorted(times)


def test_host_location_of_a_thread():
    """Inside the engine (``emu_start`` innermost), or the innermost pyemu function."""
    started = threading.Event()
    release = threading.Lock()
    release.acquire()

    def emu_start() -> None:  # stands for the Unicorn binding's method, which blocks in C (uc_emu_start)
        started.set()
        release.acquire(timeout=10)  # a C call: no Python frame above this one while it waits

    worker = threading.Thread(target=emu_start)
    worker.start()
    started.wait(10)
    try:
        for _ in range(1000):  # until the worker is past started.set() and blocked in the C call
            frames = sys._current_frames()
            if host_location(frames[worker.ident]).startswith("[in Unicorn"):
                break
            started.wait(0.01)
        assert host_location(frames[worker.ident]).startswith("[in Unicorn")
        assert host_location(frames[threading.get_ident()]) == "tests/unit/test_guest_profile.py:test_host_location_of_a_thread"
        assert host_location(None) == ""
    finally:
        release.release()
        worker.join()


def test_summary_lists_host_locations():
    symbols = KernelSymbols.from_kallsyms(KALLSYMS)
    samples = [Sample(i / 10, 0xFFFFFFFF81000000, False, ENGINE) for i in range(3)]
    samples.append(Sample(0.3, 0xFFFFFFFF81000000, False, "hw/x.py:f"))
    summary = summarise(Profile(10.0, samples, 0.4), symbols)
    assert summary["host_top"] == [{"where": ENGINE, "share": 0.75}, {"where": "hw/x.py:f", "share": 0.25}]
    assert "host_top" not in summarise(Profile(1.0, [Sample(0.0, 0, False)], 1.0), symbols)


def test_gdb_packet_framing():
    bench = load_benchmark()
    assert bench.GdbRemote.frame("g") == b"$g#67"
    assert bench.GdbRemote.frame("m1000,1") == b"$m1000,1#" + f"{sum(b'm1000,1') & 0xFF:02x}".encode()
    assert bench.GdbRemote.parse(b"+$T02thread:01;#04+$OK#9a") == ("T02thread:01;", b"+$OK#9a")
    assert bench.GdbRemote.parse(b"+$OK#9") == (None, b"$OK#9")  # checksum not complete yet
    assert bench.GdbRemote.parse(b"+") == (None, b"")


def test_gdb_client_against_a_scripted_stub():
    """Stop reply on attach, RIP from the ``g`` block (after 16 GPRs), one memory byte, acks sent."""
    bench = load_benchmark()
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    rip = 0xFFFFFFFF81002F9F
    received: list[bytes] = []

    def stub() -> None:
        conn, _ = server.accept()
        with conn:
            conn.sendall(bench.GdbRemote.frame("T02thread:01;"))
            replies = {b"g": "00" * 128 + rip.to_bytes(8, "little").hex() + "00" * 16,
                       f"m{rip - 1:x},1".encode(): "f4", b"c": None}
            buffer = b""
            while True:
                try:
                    chunk = conn.recv(4096)
                except ConnectionResetError:  # the client closed with our last acks unread
                    return
                if not chunk:
                    return
                received.append(chunk)
                buffer += chunk
                while b"#" in buffer and b"$" in buffer:
                    start = buffer.index(b"$")
                    end = buffer.index(b"#", start)
                    if len(buffer) < end + 3:
                        break
                    payload, buffer = buffer[start + 1:end], buffer[end + 3:]
                    conn.sendall(b"+")
                    reply = replies[payload]
                    if reply is not None:
                        conn.sendall(bench.GdbRemote.frame(reply))

    thread = threading.Thread(target=stub, daemon=True)
    thread.start()
    gdb = bench.GdbRemote(port)
    try:
        assert gdb.stop_reply == "T02thread:01;"
        assert gdb.read_rip() == rip
        assert gdb.read_byte(rip - 1) == 0xF4
        gdb.resume()
    finally:
        gdb.close()
        server.close()
    thread.join(10)
    assert b"+" in b"".join(received)  # every reply was acknowledged


def test_tsc_khz_option():
    bench = load_benchmark()
    assert bench.tsc_khz(None) is None
    assert bench.tsc_khz(1234567) == 1234567
    assert bench.tsc_khz(0) > 0


def test_compare_orders_by_extra_seconds():
    bench = load_benchmark()
    rows = bench.compare({"a": 1.0, "b": 0.5}, {"a": 0.2, "c": 0.4})
    assert [row["function"] for row in rows] == ["a", "b", "c"]
    assert rows[0]["extra_s"] == 0.8 and rows[-1]["extra_s"] == -0.4
