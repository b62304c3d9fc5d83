"""Guest-physical accesses the vCPU makes itself (descriptor tables, TSS, stack frames, page tables).

Reads of RAM go straight to the shared guest RAM mapping. Writes of RAM go through ``uc.mem_write`` so the
engine invalidates any translated code on the page (a stack frame pushed over code must not leave stale
translations behind). Anything outside RAM is a device window and goes to the MMIO bus through the
dispatcher, exactly as a guest access would (QEMU's address_space_rw).
"""

from __future__ import annotations

import struct
from typing import Callable

from unicorn import Uc

from pyemu.accel.dispatch import ExitDispatcher
from pyemu.system.memory import GuestMemory, store_u32, store_u64


_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")


class GuestPhysical:
    def __init__(self, uc: Uc, memory: GuestMemory, dispatcher: ExitDispatcher,
                 on_write: Callable[[int, int], None] | None = None) -> None:
        self._uc = uc
        # Reports RAM this vCPU wrote without a TLB entry (the dirty log of live migration).
        self._on_write = on_write
        self._memory = memory
        self._dispatcher = dispatcher
        # (start, end, view) per RAM region: page-table walks read entries here without the
        # bounds-checked GuestMemory accessors (a walk is 4 reads, several walks per delivery).
        self._ram = [(r.gpa, r.end, memory.view(r.gpa, r.size)) for r in memory.regions]

    def _ram_view(self, gpa: int, size: int) -> tuple[memoryview, int] | None:
        for start, end, view in self._ram:
            if start <= gpa and gpa + size <= end:
                return view, gpa - start
        return None

    def read(self, gpa: int, size: int) -> bytes:
        found = self._ram_view(gpa, size)
        if found is not None:
            return bytes(found[0][found[1]:found[1] + size])
        out = bytearray()
        for offset in range(0, size, 4):
            chunk = min(4, size - offset)
            if self._memory.contains(gpa + offset, chunk):
                out += self._memory.read(gpa + offset, chunk)
            else:
                out += self._dispatcher.mmio_read(gpa + offset, chunk).to_bytes(chunk, "little")
        return bytes(out)

    def write(self, gpa: int, data: bytes) -> None:
        if self._memory.contains(gpa, len(data)):
            self._uc.mem_write(gpa, data)
            if self._on_write is not None:
                self._on_write(gpa, len(data))
            return
        for offset in range(0, len(data), 4):
            chunk = data[offset:offset + 4]
            if self._memory.contains(gpa + offset, len(chunk)):
                self._uc.mem_write(gpa + offset, chunk)
                if self._on_write is not None:
                    self._on_write(gpa + offset, len(chunk))
            else:
                self._dispatcher.mmio_write(gpa + offset, len(chunk), int.from_bytes(chunk, "little"))

    def read_u64(self, gpa: int) -> int:
        found = self._ram_view(gpa, 8)
        if found is not None:
            return int(_U64.unpack_from(found[0], found[1])[0])
        return int(_U64.unpack(self.read(gpa, 8))[0])

    def read_u32(self, gpa: int) -> int:
        found = self._ram_view(gpa, 4)
        if found is not None:
            return int(_U32.unpack_from(found[0], found[1])[0])
        return int(_U32.unpack(self.read(gpa, 4))[0])

    def set_bits_u64(self, gpa: int, bits: int) -> None:
        """OR ``bits`` into a page-table entry in RAM (accessed/dirty); entries outside RAM are left alone."""
        found = self._ram_view(gpa, 8)
        if found is not None:
            view, offset = found
            old = _U64.unpack_from(view, offset)[0]
            if old | bits != old:
                store_u64(view, offset, old | bits)  # one store: not pack_into, which zeroes first
                if self._on_write is not None:
                    self._on_write(gpa, 8)

    def set_bits_u32(self, gpa: int, bits: int) -> None:
        found = self._ram_view(gpa, 4)
        if found is not None:
            view, offset = found
            old = _U32.unpack_from(view, offset)[0]
            if old | bits != old:
                store_u32(view, offset, old | bits)
                if self._on_write is not None:
                    self._on_write(gpa, 4)
