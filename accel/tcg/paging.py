"""Linear-to-physical translation for the vCPU's own accesses, with architectural #PF error codes.

Exception delivery reads the IDT, GDT and TSS and pushes the frame through the guest's page tables, as the
hardware does; a page that is not present or not writable there must raise #PF (becoming a double fault
when it happens during delivery), with CR2 = the linear address. Unicorn offers no such walk with fault
reporting, so this module implements the 4-level (long mode), PAE and 32-bit (with PSE) walks, sets
accessed/dirty bits like the hardware, and raises :class:`~pyemu.accel.tcg.errors.GuestFault`.
Not modelled: 5-level paging (CR4.LA57 is never offered), protection keys, SMEP/SMAP on implicit accesses.
"""

from __future__ import annotations

from typing import NamedTuple

from pyemu.accel.tcg.errors import GuestFault
from pyemu.accel.tcg.physmem import GuestPhysical
from pyemu.target.x86.cpu_state import CR0_PG, CR0_WP, CR4_PAE, EFER_LMA, EFER_NXE

PF_PRESENT = 1 << 0
PF_WRITE = 1 << 1
PF_USER = 1 << 2
PF_RSVD = 1 << 3
PF_FETCH = 1 << 4

_P = 1 << 0
_RW = 1 << 1
_US = 1 << 2
_A = 1 << 5
_D = 1 << 6
_PS = 1 << 7
_NX = 1 << 63
_CR4_PSE = 1 << 4
_PHYS_BITS = 40
_ADDR_RSVD = ((1 << 52) - 1) & ~((1 << _PHYS_BITS) - 1)  # address bits above MAXPHYADDR in an entry
_VECTOR_PF = 14
_VECTOR_GP = 13


class PagingRegs(NamedTuple):
    cr0: int
    cr3: int
    cr4: int
    efer: int


def canonical(address: int) -> bool:
    top = address >> 47
    return top == 0 or top == 0x1FFFF


_CACHE_LIMIT = 512


class PageWalker:
    """Walks with a small translation cache, which behaves like a TLB: an entry is reused while the
    leaf entry it came from still holds the same value (a guest that changes that PTE, or clears its
    accessed/dirty bits, forces a fresh walk). Like a hardware TLB it may keep a translation after the
    guest rewrote an upper-level entry, until that leaf changes; delivery touches the same few pages
    (IDT, GDT, TSS, kernel stacks) over and over, so the cache saves most of the walks."""

    def __init__(self, phys: GuestPhysical) -> None:
        self._phys = phys
        self._cache: dict[tuple[PagingRegs, int, bool, bool, bool], tuple[int, int, int, int]] = {}

    def translate(self, linear: int, regs: PagingRegs, *, write: bool, user: bool, fetch: bool = False) -> int:
        """The physical address of ``linear``; raises GuestFault(#PF, error code, cr2) or GuestFault(#GP)
        for a non-canonical address in long mode."""
        if regs.efer & EFER_LMA:
            if not canonical(linear):
                raise GuestFault(_VECTOR_GP, 0)
        else:
            linear &= 0xFFFF_FFFF
        if not regs.cr0 & CR0_PG:
            return linear
        key = (regs, linear >> 12, write, user, fetch)
        hit = self._cache.get(key)
        if hit is not None:
            leaf_address, leaf_value, width, page = hit
            read = self._phys.read_u64 if width == 8 else self._phys.read_u32
            if read(leaf_address) == leaf_value:
                return page | (linear & 0xFFF)
        if regs.efer & EFER_LMA:
            physical, leaf = self._walk_long(linear, regs, write, user, fetch)
        elif regs.cr4 & CR4_PAE:
            physical, leaf = self._walk_pae(linear, regs, write, user, fetch)
        else:
            physical, leaf = self._walk_legacy(linear, regs, write, user, fetch)
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[key] = (*leaf, physical & ~0xFFF)
        return physical

    def flush(self) -> None:
        """Forget every cached translation (state load, reset)."""
        self._cache.clear()

    # -- walks ------------------------------------------------------------------------------------------
    def _fault(self, linear: int, bits: int, write: bool, user: bool, fetch: bool, regs: PagingRegs) -> GuestFault:
        code = bits | (PF_WRITE if write else 0) | (PF_USER if user else 0)
        if fetch and regs.efer & EFER_NXE and regs.cr4 & CR4_PAE:
            code |= PF_FETCH
        return GuestFault(_VECTOR_PF, code, cr2=linear)

    def _walk_long(self, linear: int, regs: PagingRegs, write: bool, user: bool,
                   fetch: bool) -> tuple[int, tuple[int, int, int]]:
        table = regs.cr3 & 0x000F_FFFF_FFFF_F000
        entries: list[tuple[int, int]] = []
        for level, shift in enumerate((39, 30, 21, 12)):
            address = table + ((linear >> shift) & 0x1FF) * 8
            entry = self._phys.read_u64(address)
            if not entry & _P:
                raise self._fault(linear, 0, write, user, fetch, regs)
            if entry & _ADDR_RSVD or (entry & _NX and not regs.efer & EFER_NXE) or (level == 0 and entry & _PS):
                raise self._fault(linear, PF_PRESENT | PF_RSVD, write, user, fetch, regs)
            entries.append((address, entry))
            if level in (1, 2) and entry & _PS:
                size_mask = (1 << shift) - 1
                physical = (entry & 0x000F_FFFF_FFFF_F000 & ~size_mask) | (linear & size_mask)
                break
            table = entry & 0x000F_FFFF_FFFF_F000
        else:
            physical = (entry & 0x000F_FFFF_FFFF_F000) | (linear & 0xFFF)
        return physical, self._check_and_mark(entries, 8, linear, regs, write, user, fetch)

    def _walk_pae(self, linear: int, regs: PagingRegs, write: bool, user: bool,
                  fetch: bool) -> tuple[int, tuple[int, int, int]]:
        pdpte = self._phys.read_u64((regs.cr3 & 0xFFFF_FFE0) + ((linear >> 30) & 3) * 8)
        if not pdpte & _P:
            raise self._fault(linear, 0, write, user, fetch, regs)
        table = pdpte & 0x000F_FFFF_FFFF_F000
        entries: list[tuple[int, int]] = []
        for shift in (21, 12):
            address = table + ((linear >> shift) & 0x1FF) * 8
            entry = self._phys.read_u64(address)
            if not entry & _P:
                raise self._fault(linear, 0, write, user, fetch, regs)
            if entry & _ADDR_RSVD or (entry & _NX and not regs.efer & EFER_NXE):
                raise self._fault(linear, PF_PRESENT | PF_RSVD, write, user, fetch, regs)
            entries.append((address, entry))
            if shift == 21 and entry & _PS:
                physical = (entry & 0x000F_FFFF_FFE0_0000) | (linear & 0x1F_FFFF)
                break
            table = entry & 0x000F_FFFF_FFFF_F000
        else:
            physical = (entry & 0x000F_FFFF_FFFF_F000) | (linear & 0xFFF)
        return physical, self._check_and_mark(entries, 8, linear, regs, write, user, fetch)

    def _walk_legacy(self, linear: int, regs: PagingRegs, write: bool, user: bool,
                     fetch: bool) -> tuple[int, tuple[int, int, int]]:
        pde_address = (regs.cr3 & 0xFFFF_F000) + (linear >> 22) * 4
        pde = self._phys.read_u32(pde_address)
        if not pde & _P:
            raise self._fault(linear, 0, write, user, fetch, regs)
        if pde & _PS and regs.cr4 & _CR4_PSE:
            physical = (pde & 0xFFC0_0000) | (((pde >> 13) & 0xFF) << 32) | (linear & 0x3F_FFFF)
            return physical, self._check_and_mark([(pde_address, pde)], 4, linear, regs, write, user, fetch)
        pte_address = (pde & 0xFFFF_F000) + ((linear >> 12) & 0x3FF) * 4
        pte = self._phys.read_u32(pte_address)
        if not pte & _P:
            raise self._fault(linear, 0, write, user, fetch, regs)
        leaf = self._check_and_mark([(pde_address, pde), (pte_address, pte)], 4, linear, regs, write, user, fetch)
        return (pte & 0xFFFF_F000) | (linear & 0xFFF), leaf

    def _check_and_mark(self, entries: list[tuple[int, int]], width: int, linear: int, regs: PagingRegs,
                        write: bool, user: bool, fetch: bool) -> tuple[int, int, int]:
        """Permission checks over the whole walk, then accessed/dirty bits; returns the leaf entry
        (address, value after marking, width) for the translation cache."""
        values = [value for _, value in entries]
        writable = all(v & _RW for v in values)
        user_ok = all(v & _US for v in values)
        no_exec = width == 8 and bool(regs.efer & EFER_NXE) and any(v & _NX for v in values)
        if user and not user_ok:
            raise self._fault(linear, PF_PRESENT, write, user, fetch, regs)
        if write and not writable and (user or regs.cr0 & CR0_WP):
            raise self._fault(linear, PF_PRESENT, write, user, fetch, regs)
        if fetch and no_exec:
            raise self._fault(linear, PF_PRESENT, write, user, fetch, regs)
        mark = self._phys.set_bits_u64 if width == 8 else self._phys.set_bits_u32
        for index, (address, value) in enumerate(entries):
            bits = _A | (_D if write and index == len(entries) - 1 else 0)
            if value & bits != bits:
                mark(address, bits)
        leaf_address, leaf_value = entries[-1]
        read = self._phys.read_u64 if width == 8 else self._phys.read_u32
        return leaf_address, read(leaf_address), width


class LinearMemory:
    """Byte-granular reads and writes of linear memory (page-crossing), for one paging configuration."""

    def __init__(self, walker: PageWalker, phys: GuestPhysical, regs: PagingRegs) -> None:
        self._walker = walker
        self._phys = phys
        self.regs = regs

    def _pieces(self, linear: int, size: int, *, write: bool, user: bool, fetch: bool = False):
        pieces = []
        mask = 0xFFFF_FFFF_FFFF_FFFF if self.regs.efer & EFER_LMA else 0xFFFF_FFFF
        while size > 0:
            chunk = min(size, 0x1000 - (linear & 0xFFF))
            pieces.append((self._walker.translate(linear, self.regs, write=write, user=user, fetch=fetch), chunk))
            linear = (linear + chunk) & mask
            size -= chunk
        return pieces

    def read(self, linear: int, size: int, *, user: bool = False, fetch: bool = False) -> bytes:
        pieces = self._pieces(linear, size, write=False, user=user, fetch=fetch)
        return b"".join(self._phys.read(gpa, chunk) for gpa, chunk in pieces)

    def write(self, linear: int, data: bytes, *, user: bool = False) -> None:
        """Translate every page first, so a fault leaves memory untouched."""
        pieces = self._pieces(linear, len(data), write=True, user=user)
        offset = 0
        for gpa, chunk in pieces:
            self._phys.write(gpa, data[offset:offset + chunk])
            offset += chunk
