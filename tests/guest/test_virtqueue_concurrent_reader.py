"""A guest reading a virtqueue's used ring while the device writes it never sees a field go backwards.

Regression test for the rare virtio-net failures of 2026-12 ("output.0:id 1 is not a head!", receive
queues marked broken, stalled transfers): the device wrote the used index with ``struct.pack_into``,
which clears its destination before it packs, so a vCPU reading at that moment saw the index as 0 and
Linux's driver took stale used entries. Here a guest program under the software CPU (which runs without
the GIL, truly beside the pushing thread) reads the index millions of times while a host thread pushes;
with the old store it saw 0 within milliseconds."""

from __future__ import annotations

import threading

from pyemu.hw.core.dma import DmaMemory
from pyemu.hw.virtio.queue import DescriptorChain, Virtqueue
from pyemu.testing import GuestProgram, prepared
from pyemu.testing.environment import DATA
from pyemu.testing.handlers import exit_with

RINGS = 0x300000           # free RAM in the test environment (identity-mapped 2 MiB page)
QUEUE_SIZE = 256
DESC, AVAIL, USED = RINGS, RINGS + 0x1000, RINGS + 0x2000
CHANGES = 20_000
MAX_READS = 2_000_000_000
GOOD, TORN = 0x600D, 0xBAD0

# The index only moves forward, by fewer than 0x8000 between two reads; a step of 0x8000 or more either
# way is a torn store (a passage through 0 is such a step from or to any index away from 0 and 0x8000).
# r8 counts the changes seen (stored at `data`), to show the device really wrote during the reads. The
# guest reads until it has seen CHANGES of them (about what 20 million reads saw on an idle host), not for
# a fixed number of reads: on a loaded host the pushing thread gets fewer turns on a CPU per read, so a
# fixed count saw as few as 31 changes. MAX_READS only bounds a device thread that never runs.
READER = f"""
    mov rsi, {USED + 2}
    mov rcx, {MAX_READS}
    xor r8d, r8d
    movzx eax, word ptr [rsi]
again:
    movzx edx, word ptr [rsi]
    mov ebx, edx
    sub ebx, eax
    and ebx, 0xffff
    jz same
    inc r8
    cmp ebx, 0x8000
    jae torn
    cmp r8, {CHANGES}
    jae counted
same:
    mov eax, edx
    dec rcx
    jnz again
counted:
    mov rdi, data
    mov [rdi], r8
    {exit_with(GOOD)}
torn:
    {exit_with(TORN)}
"""


def test_guest_never_sees_a_torn_used_index() -> None:
    with prepared(GuestProgram(READER)) as machine:
        dma = DmaMemory(machine.board.memory)
        queue = Virtqueue(0, QUEUE_SIZE)
        queue.desc_addr, queue.avail_addr, queue.used_addr = DESC, AVAIL, USED
        queue.activate(event_idx=True, indirect=False)
        chain = DescriptorChain.from_pieces(0, (), (), 0, 0)
        done = threading.Event()
        pushes = [0]

        def device() -> None:
            while not done.is_set():
                queue.push(dma, chain, 0)
                queue._put_used_u16(dma, 4 + 8 * QUEUE_SIZE, queue.used_idx)  # avail_event, as pop writes it
                pushes[0] += 1

        thread = threading.Thread(target=device, daemon=True)
        thread.start()
        try:
            machine.vcpu.run()
        finally:
            done.set()
            thread.join()
        assert machine.board.exit_device.value == GOOD, f"the guest saw a torn used index after {pushes[0]} pushes"
        changes = machine.board.memory.read_u64(DATA)
        assert changes >= 50, f"only {changes} index changes seen: the device did not write during the reads"
