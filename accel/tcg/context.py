"""The engine's CPU state as patchable bytes: one reusable ``UcContext`` and typed accessors into it.

``pull()`` copies the live CPU state into the buffer (``uc_context_save``, ~0.5 µs), the accessors read or
patch fields at the offsets :mod:`pyemu.accel.tcg.calibration` found, ``push()`` copies it back
(``uc_context_restore``). Reading a field here costs a ``struct.unpack_from``; a ``uc.reg_read`` through
the Python binding costs ~2 µs, which matters in hooks that run for every guest exception and SYSCALL.

RFLAGS caveat: while the engine executes (inside a hook) QEMU keeps the arithmetic flags and DF outside
``env->eflags``; the blob's RFLAGS field is only complete between ``emu_start`` calls. Hooks therefore read
and write RFLAGS and RIP through ``uc.reg_read``/``reg_write`` (see :class:`~pyemu.accel.tcg.cpu.CpuAccess`).
"""

from __future__ import annotations

import ctypes
import struct

from unicorn import Uc

from pyemu.accel.tcg.calibration import BlobLayout
from pyemu.accel.tcg.segments import SegCache

_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_I32 = struct.Struct("<i")
_SEGMENT = struct.Struct("<I4xQII")  # QEMU's SegmentCache: selector, (pad), base, limit, flags


class CpuBlob:
    """One engine's CPU-state blob, reused for every pull/push."""

    def __init__(self, uc: Uc, layout: BlobLayout) -> None:
        self._uc = uc
        self.layout = layout
        self._ctx = uc.context_save()
        address = ctypes.cast(self._ctx.context, ctypes.c_void_p).value
        if address is None or self._ctx.size != layout.size:
            from pyemu.accel.tcg.errors import CalibrationError

            raise CalibrationError("context size differs from the calibrated layout", field="size")
        self._raw = (ctypes.c_ubyte * layout.size).from_address(address)
        self.view = memoryview(self._raw)
        seg = layout.seg
        self._packed_segments = (seg.selector, seg.base, seg.limit, seg.flags) == (0, 8, 16, 20)

    def pull(self) -> None:
        """Copy the engine's current CPU state into the buffer."""
        self._uc.context_update(self._ctx)

    def push(self) -> None:
        """Copy the buffer back into the engine."""
        self._uc.context_restore(self._ctx)

    def snapshot(self) -> bytes:
        """A copy of the buffer (to put back with :meth:`restore`)."""
        return bytes(self._raw)

    def restore(self, data: bytes) -> None:
        """Overwrite the buffer with an earlier :meth:`snapshot` (then :meth:`push` it)."""
        ctypes.memmove(self._raw, data, len(data))

    # -- raw fields -------------------------------------------------------------------------------------
    def u64(self, offset: int) -> int:
        return int(_U64.unpack_from(self.view, offset)[0])

    def set_u64(self, offset: int, value: int) -> None:
        _U64.pack_into(self.view, offset, value & 0xFFFF_FFFF_FFFF_FFFF)

    def u32(self, offset: int) -> int:
        return int(_U32.unpack_from(self.view, offset)[0])

    def set_u32(self, offset: int, value: int) -> None:
        _U32.pack_into(self.view, offset, value & 0xFFFF_FFFF)

    # -- named fields -----------------------------------------------------------------------------------
    def gpr(self, name: str) -> int:
        return self.u64(self.layout.gpr[name])

    def set_gpr(self, name: str, value: int) -> None:
        self.set_u64(self.layout.gpr[name], value)

    def segment(self, name: str) -> SegCache:
        """``name`` is es/cs/ss/ds/fs/gs, ldt or tr."""
        start = self._segment_offset(name)
        if self._packed_segments:
            return SegCache(*_SEGMENT.unpack_from(self.view, start))
        seg = self.layout.seg
        return SegCache(self.u32(start + seg.selector), self.u64(start + seg.base),
                        self.u32(start + seg.limit), self.u32(start + seg.flags))

    def set_segment(self, name: str, cache: SegCache) -> None:
        start = self._segment_offset(name)
        if self._packed_segments:
            _SEGMENT.pack_into(self.view, start, cache.selector & 0xFFFF_FFFF, cache.base & 0xFFFF_FFFF_FFFF_FFFF,
                               cache.limit & 0xFFFF_FFFF, cache.flags & 0xFFFF_FFFF)
            return
        seg = self.layout.seg
        self.set_u32(start + seg.selector, cache.selector)
        self.set_u64(start + seg.base, cache.base)
        self.set_u32(start + seg.limit, cache.limit)
        self.set_u32(start + seg.flags, cache.flags)

    def _segment_offset(self, name: str) -> int:
        if name in self.layout.segments:
            return self.layout.segments[name]
        return {"ldt": self.layout.ldt, "tr": self.layout.tr}[name]

    def table(self, name: str) -> tuple[int, int]:
        """(base, limit) of the GDTR or IDTR."""
        start = self.layout.gdt if name == "gdt" else self.layout.idt
        return self.u64(start + self.layout.seg.base), self.u32(start + self.layout.seg.limit)

    def set_table(self, name: str, base: int, limit: int) -> None:
        start = self.layout.gdt if name == "gdt" else self.layout.idt
        self.set_u64(start + self.layout.seg.base, base)
        self.set_u32(start + self.layout.seg.limit, limit)

    @property
    def rip(self) -> int:
        return self.u64(self.layout.rip)

    @rip.setter
    def rip(self, value: int) -> None:
        self.set_u64(self.layout.rip, value)

    @property
    def rflags(self) -> int:
        """Complete only between ``emu_start`` calls (see the module docstring)."""
        return self.u64(self.layout.rflags)

    @rflags.setter
    def rflags(self, value: int) -> None:
        self.set_u64(self.layout.rflags, value)

    @property
    def hflags(self) -> int:
        return self.u32(self.layout.hflags)

    @hflags.setter
    def hflags(self, value: int) -> None:
        self.set_u32(self.layout.hflags, value)

    @property
    def hflags2(self) -> int:
        """QEMU's ``hflags2`` (bit 2, HF2_NMI_MASK: NMIs are blocked until the next IRET)."""
        return self.u32(self.layout.hflags2)

    @hflags2.setter
    def hflags2(self, value: int) -> None:
        self.set_u32(self.layout.hflags2, value)

    @property
    def xcr0(self) -> int:
        """XCR0 (the XSAVE components the guest enabled with XSETBV)."""
        return self.u64(self.layout.xcr0)

    @xcr0.setter
    def xcr0(self, value: int) -> None:
        self.set_u64(self.layout.xcr0, value)

    @property
    def pkru(self) -> int:
        """PKRU (protection-key rights for user pages, written by WRPKRU)."""
        return self.u32(self.layout.pkru)

    @pkru.setter
    def pkru(self, value: int) -> None:
        self.set_u32(self.layout.pkru, value)

    @property
    def cr0(self) -> int:
        return self.u64(self.layout.cr0)

    @property
    def cr2(self) -> int:
        return self.u64(self.layout.cr2)

    @cr2.setter
    def cr2(self, value: int) -> None:
        self.set_u64(self.layout.cr2, value)

    @property
    def cr3(self) -> int:
        return self.u64(self.layout.cr3)

    @property
    def cr4(self) -> int:
        return self.u64(self.layout.cr4)

    @property
    def efer(self) -> int:
        return self.u64(self.layout.efer)

    @efer.setter
    def efer(self, value: int) -> None:
        self.set_u64(self.layout.efer, value)

    @property
    def error_code(self) -> int:
        return int(_I32.unpack_from(self.view, self.layout.error_code)[0])

    @property
    def exception_is_int(self) -> bool:
        return bool(self.u32(self.layout.exception_is_int))

    @property
    def old_exception(self) -> int:
        return int(_I32.unpack_from(self.view, self.layout.old_exception)[0])

    @old_exception.setter
    def old_exception(self, value: int) -> None:
        _I32.pack_into(self.view, self.layout.old_exception, value)

    def msr(self, name: str) -> int:
        """STAR/LSTAR/CSTAR/FMASK by name (the SYSCALL MSRs, read in the SYSCALL hook)."""
        return self.u64(getattr(self.layout, name))
