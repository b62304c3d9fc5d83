"""system/signals.py: SIGTERM/SIGHUP end the VM (or pyemu-nbd) from a thread of their own, never inside the
signal handler.

The handler runs in the main thread between two of its bytecodes, possibly while that thread holds a lock
the shutdown needs (the machine's wait loop holds its request event's lock for a moment every 0.25 s). A
handler that took the lock itself would wait for its own thread forever: the VM ignored SIGTERM.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

from pyemu.system.signals import install_termination_handlers


SCENARIO = """
import os, signal, threading, time
from pyemu.system.signals import install_termination_handlers

lock = threading.Lock()  # stands for the wait loop's event lock
done = threading.Event()

def terminate(signum):
    with lock:
        done.set()

install_termination_handlers(terminate)
with lock:
    os.kill(os.getpid(), signal.SIGTERM)
    for _ in range(50):  # the handler runs in this thread between these bytecodes
        time.sleep(0.002)
    print("waited" if not done.is_set() else "ran early", flush=True)
print("ended" if done.wait(10) else "never ended", flush=True)
"""


def test_a_signal_that_arrives_while_the_main_thread_holds_a_lock_still_ends_the_vm() -> None:
    """In a child process: handled inside the handler, this deadlocks (and ignores further SIGTERMs), so
    the child is killed after a bounded wait and the test fails instead of hanging."""
    proc = subprocess.Popen([sys.executable, "-c", SCENARIO], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError("the process deadlocked in its SIGTERM handler") from None
    assert proc.returncode == 0, err
    assert out.split() == ["waited", "ended"]


def test_sighup_ends_the_vm_too_and_the_old_handlers_come_back() -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    got = threading.Event()
    restore = install_termination_handlers(lambda signum: got.set() if signum == signal.SIGHUP else None)
    try:
        os.kill(os.getpid(), signal.SIGHUP)
        assert got.wait(10)
    finally:
        restore()
    assert {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)} == before


def test_outside_the_main_thread_nothing_is_installed() -> None:
    results: list[object] = []
    before = signal.getsignal(signal.SIGTERM)

    def worker() -> None:
        restore = install_termination_handlers(lambda signum: None)
        results.append(signal.getsignal(signal.SIGTERM))
        restore()

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(10)
    assert results == [before]
