"""Segment descriptors, QEMU's segment caches and the translation flags (``hflags``) derived from them.

Unicorn's ``reg_write`` of CS/SS/DS/ES in 64-bit mode changes only the selector, never the hidden
descriptor cache nor the CPL, so every privilege or mode change the vCPU performs itself (exception
delivery, SYSCALL, ``load_state``) writes complete caches into the CPU-state blob and recomputes the hflags
bits QEMU derives from them, the way QEMU's ``cpu_x86_load_seg_cache``/``cpu_x86_update_cr0`` would.

A :class:`SegCache` is QEMU's representation: ``flags`` is the descriptor's high dword masked to
type/S/DPL/P/AVL/L/DB/G (bits 8..23), ``limit`` is already expanded by the granularity bit.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from pyemu.target.x86.cpu_state import CR0_PE, EFER_LMA, Segment

# Descriptor flag bits in QEMU's SegmentCache.flags (= descriptor bits 32..63).
DESC_TYPE_SHIFT = 8
DESC_S = 1 << 12
DESC_DPL_SHIFT = 13
DESC_P = 1 << 15
DESC_AVL = 1 << 20
DESC_L = 1 << 21
DESC_B = 1 << 22
DESC_G = 1 << 23
DESC_CODE = 1 << 11           # type bit 3: code segment
DESC_CONFORMING = 1 << 10     # type bit 2 for code: conforming
DESC_WRITABLE = 1 << 9        # type bit 1 for data: writable
DESC_FLAGS_MASK = 0x00F0FF00

# QEMU hflags bits (target/i386/cpu.h HF_*).
HF_CPL_MASK = 3
HF_INHIBIT_IRQ = 1 << 3
HF_CS32 = 1 << 4
HF_SS32 = 1 << 5
HF_ADDSEG = 1 << 6
HF_PE = 1 << 7
HF_MP = 1 << 9
HF_EM = 1 << 10
HF_TS = 1 << 11
HF_LMA = 1 << 14
HF_CS64 = 1 << 15
HF_OSFXSR = 1 << 22
HF_SMAP = 1 << 23
_DERIVED = (HF_CPL_MASK | HF_INHIBIT_IRQ | HF_CS32 | HF_SS32 | HF_ADDSEG | HF_PE | HF_MP | HF_EM | HF_TS
            | HF_LMA | HF_CS64 | HF_OSFXSR | HF_SMAP)

CR4_OSFXSR = 1 << 9
CR4_SMAP = 1 << 21


class SegCache(NamedTuple):
    """One segment register as QEMU caches it (a NamedTuple: created on every delivery, cheaply)."""

    selector: int
    base: int
    limit: int
    flags: int

    @property
    def dpl(self) -> int:
        return (self.flags >> DESC_DPL_SHIFT) & 3

    @property
    def present(self) -> bool:
        return bool(self.flags & DESC_P)

    @property
    def type(self) -> int:
        return (self.flags >> DESC_TYPE_SHIFT) & 0xF

    @property
    def is_code(self) -> bool:
        return bool(self.flags & DESC_S) and bool(self.flags & DESC_CODE)

    @property
    def long(self) -> bool:
        return bool(self.flags & DESC_L)

    @property
    def big(self) -> bool:
        return bool(self.flags & DESC_B)


def null_segment(rpl: int = 0) -> SegCache:
    """A null selector as QEMU loads it into SS on a 64-bit privilege change (only the DPL is kept)."""
    return SegCache(rpl, 0, 0, rpl << DESC_DPL_SHIFT)


def flat_code64(selector: int, dpl: int) -> SegCache:
    """The CS cache SYSCALL/SYSRET establish: base 0, limit 4 GiB, 64-bit code, present."""
    return SegCache(selector, 0, 0xFFFFFFFF,
                    DESC_G | DESC_L | DESC_P | (dpl << DESC_DPL_SHIFT) | DESC_S | (0xB << DESC_TYPE_SHIFT))


def flat_code32(selector: int, dpl: int) -> SegCache:
    return SegCache(selector, 0, 0xFFFFFFFF,
                    DESC_G | DESC_B | DESC_P | (dpl << DESC_DPL_SHIFT) | DESC_S | (0xB << DESC_TYPE_SHIFT))


def flat_data(selector: int, dpl: int) -> SegCache:
    """The SS cache SYSCALL establishes: base 0, limit 4 GiB, writable 32-bit data, present."""
    return SegCache(selector, 0, 0xFFFFFFFF,
                    DESC_G | DESC_B | DESC_P | (dpl << DESC_DPL_SHIFT) | DESC_S | (0x3 << DESC_TYPE_SHIFT))


def parse_descriptor(raw: bytes, selector: int) -> SegCache:
    """An 8-byte GDT/LDT code or data descriptor as a cache (limit expanded by G)."""
    low, high = struct.unpack_from("<II", raw)
    base = ((low >> 16) & 0xFFFF) | ((high & 0xFF) << 16) | (high & 0xFF000000)
    limit = (low & 0xFFFF) | (high & 0x000F0000)
    if high & DESC_G:
        limit = (limit << 12) | 0xFFF
    return SegCache(selector, base, limit, high & DESC_FLAGS_MASK)


def segment_to_cache(segment: Segment) -> SegCache:
    """The architectural :class:`Segment` (KVM's kvm_segment) as QEMU's cache."""
    present = segment.present and not segment.unusable
    flags = ((segment.type & 0xF) << DESC_TYPE_SHIFT | (DESC_S if segment.s else 0)
             | (segment.dpl & 3) << DESC_DPL_SHIFT | (DESC_P if present else 0) | (DESC_L if segment.l else 0)
             | (DESC_B if segment.db else 0) | (DESC_G if segment.g else 0))
    return SegCache(segment.selector & 0xFFFF, segment.base, segment.limit & 0xFFFFFFFF, flags)


def cache_to_segment(cache: SegCache) -> Segment:
    return Segment(
        selector=cache.selector & 0xFFFF, base=cache.base, limit=cache.limit, type=cache.type,
        present=cache.present, dpl=cache.dpl, db=cache.big, s=bool(cache.flags & DESC_S), l=cache.long,
        g=bool(cache.flags & DESC_G), unusable=not cache.present,
    )


def compute_hflags(old: int, *, cpl: int, cs: SegCache, ss: SegCache, ds: SegCache, es: SegCache,
                   cr0: int, cr4: int, efer: int, rflags_vm: bool = False) -> int:
    """The hflags QEMU would hold for this state: CPL, code/stack size, long mode, PE, FPU bits, ADDSEG.

    The interrupt shadow (HF_INHIBIT_IRQ) is cleared: every caller ends an instruction boundary where no
    shadow survives (a delivery, SYSCALL, a state load). Bits QEMU maintains elsewhere (SMM, SVM, ...)
    are kept from ``old``.
    """
    flags = old & ~_DERIVED
    flags |= cpl & 3
    pe = bool(cr0 & CR0_PE)
    if pe:
        flags |= HF_PE
    flags |= (cr0 << 8) & (HF_MP | HF_EM | HF_TS)
    if cr4 & CR4_OSFXSR:
        flags |= HF_OSFXSR
    if cr4 & CR4_SMAP:
        flags |= HF_SMAP
    if efer & EFER_LMA:
        flags |= HF_LMA
    if efer & EFER_LMA and cs.long:
        flags |= HF_CS32 | HF_SS32 | HF_CS64
        return flags
    if cs.big:
        flags |= HF_CS32
    if ss.big:
        flags |= HF_SS32
    if not pe or rflags_vm or not cs.big:
        flags |= HF_ADDSEG
    elif ds.base | es.base | ss.base:
        flags |= HF_ADDSEG
    return flags
