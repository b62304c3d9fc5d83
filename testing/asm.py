"""Assemble x86 guest snippets with keystone, with cross-section symbols and a guard against a keystone bug.

keystone 0.9.2 sometimes encodes an absolute memory operand (``mov rax, [0x40000]``) as RIP-relative with
the wrong displacement (DESIGN.md). Guest programs should use register-based addressing
(``mov rbx, data`` then ``mov rax, [rbx]``); :func:`assemble` disassembles its output with capstone and
refuses any RIP-relative operand the source did not ask for explicitly, so the bug cannot silently
corrupt a test.

keystone 0.9.2 (this build, measured) also reads every unprefixed number as hexadecimal: ``mov eax, 42``
assembles to ``mov eax, 0x42``. Guest programs are written with ordinary Intel-syntax decimals, so
:func:`assemble` rewrites each bare multi-digit decimal literal to its ``0x`` form before assembling
(single digits mean the same in both bases; ``0x`` literals and digits inside names are left alone).

keystone treats ``;`` as a statement separator; Intel-syntax ``;`` comments are stripped first (outside
quoted strings), so snippets may be commented the usual way.

Symbols that a snippet does not define itself (other sections, environment addresses such as ``data`` or
``stack_top``) are resolved through keystone's symbol resolver from the ``symbols`` mapping.
"""

from __future__ import annotations

import functools
import re
import threading
from typing import Callable, Mapping

import capstone
import keystone

from pyemu.testing.errors import AssemblyError

_DECIMAL = re.compile(r"(?<![\w$.])(\d{2,})(?![\w.])")
_MODES = {16: keystone.KS_MODE_16, 32: keystone.KS_MODE_32, 64: keystone.KS_MODE_64}
_CS_MODES = {16: capstone.CS_MODE_16, 32: capstone.CS_MODE_32, 64: capstone.CS_MODE_64}


def assemble(source: str, *, address: int, bits: int = 64, symbols: Mapping[str, int] | None = None,
             section: str = "code", default_symbol: int | None = None) -> bytes:
    """Assemble Intel-syntax ``source`` placed at ``address``.

    ``default_symbol`` (used for sizing passes) is the value of any symbol missing from ``symbols``;
    without it a missing symbol is an :class:`AssemblyError`.
    """
    if bits not in _MODES:
        raise AssemblyError(f"unsupported operand size {bits}", section=section)
    known = dict(symbols or {})
    missing: list[str] = []

    def resolve(name: str) -> int | None:
        if name in known:
            return known[name]
        if default_symbol is not None:
            return default_symbol
        missing.append(name)
        return None

    engine = _engine(bits)
    _resolving.current = resolve
    try:
        encoding, _count = engine.asm(decimals_as_hex(strip_comments(source)), address)
    except keystone.KsError as exc:
        hint = f" (unknown symbol {missing[0]!r})" if missing else ""
        raise AssemblyError(f"keystone: {exc}{hint}", section=section) from exc
    finally:
        _resolving.current = None
    if encoding is None:
        return b""
    code = bytes(encoding)
    if "rip" not in source.lower():
        _refuse_rip_relative(code, address, bits, section)
    return code


class _Resolving(threading.local):
    current: Callable[[str], int | None] | None = None


_resolving = _Resolving()


@functools.cache
def _engine(bits: int) -> keystone.Ks:
    """One keystone engine per mode, kept for the life of the process.

    Why cached: keystone 0.9.2 has a global side effect -- once an engine that had a symbol resolver is
    closed (garbage-collected), every engine created afterwards reads unprefixed numbers as hex
    (measured: ``mov eax, 100`` then encodes 0x100). Never closing ours keeps other keystone users in the
    same process (other test kits) correct. An engine with a resolver itself reads numbers as hex, hence
    :func:`decimals_as_hex`. The resolver consults the symbols of the call in progress.
    """
    engine = keystone.Ks(keystone.KS_ARCH_X86, _MODES[bits])

    def resolve(name: bytes, value: object) -> bool:
        lookup = _resolving.current
        found = lookup(name.decode()) if lookup is not None else None
        if found is None:
            return False
        value[0] = found  # type: ignore[index]
        return True

    engine.sym_resolver = resolve
    return engine


def strip_comments(source: str) -> str:
    """Remove ``;`` comments (keystone would read ``;`` as a statement separator)."""
    lines = []
    for line in source.splitlines():
        quoted = False
        for index, char in enumerate(line):
            if char == '"':
                quoted = not quoted
            elif char == ";" and not quoted:
                line = line[:index]
                break
        lines.append(line)
    return "\n".join(lines)


def decimals_as_hex(source: str) -> str:
    """Rewrite bare decimal literals as 0x literals (keystone reads unprefixed numbers as hex)."""
    return _DECIMAL.sub(lambda match: hex(int(match.group(1))), source)


def _refuse_rip_relative(code: bytes, address: int, bits: int, section: str) -> None:
    if bits != 64:
        return
    disassembler = capstone.Cs(capstone.CS_ARCH_X86, _CS_MODES[bits])
    for insn in disassembler.disasm(code, address):
        if "rip" in insn.op_str:
            raise AssemblyError(
                f"keystone produced a RIP-relative operand at {insn.address:#x} ({insn.mnemonic} {insn.op_str}); "
                "use register-based addressing (mov rbx, symbol; mov rax, [rbx])", section=section)
