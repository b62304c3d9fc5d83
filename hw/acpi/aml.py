"""An AML byte-code builder: the subset of ACPI Machine Language a small virtual board's DSDT needs.

Why build AML in code instead of shipping a compiled DSDT: the DSDT describes the board as configured
(how many virtio-mmio slots, which GSIs, where the GED registers are), so it must be produced from the same
constants the device models use. Encodings follow ACPI 6.x chapter 20 ("ACPI Machine Language
Specification"); the unit tests check them byte by byte and against ``iasl``.

Every function returns an :class:`Aml` value: encoded byte code, ready to be nested into another term or
appended to a table. Functions are named after the ASL operators they encode, in snake case
(``device``, ``method``, ``if_``...). Argument conventions:

* where the grammar wants a *value* (``name`` data, package elements) a Python ``int`` becomes the
  shortest integer encoding and a ``str`` becomes a string literal;
* where it wants a *name* (``notify``'s target, ``store``'s destination, a region in ``field``) a ``str``
  is a name path such as ``"\\\\_SB.PWRB"`` or ``"^GED"``;
* operands of expressions (``store``'s source, ``lequal``, ``and_``...) are ``Aml`` or ``int``; refer to a
  named object with :func:`name_ref` and to locals/arguments with :data:`LOCAL0`... / :func:`arg`.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Union

from pyemu.hw.acpi.errors import AmlError


class Aml(bytes):
    """Encoded AML byte code. A distinct type so raw buffer contents are never mistaken for byte code."""

    def __repr__(self) -> str:
        return f"Aml({self.hex(' ')})"


Value = Union[Aml, int, str]
Operand = Union[Aml, int]

# --- Opcodes (ACPI 6.x, 20.3 "AML Byte Stream Byte Values") ------------------------------------------------
ZERO_OP = 0x00
ONE_OP = 0x01
NAME_OP = 0x08
BYTE_PREFIX = 0x0A
WORD_PREFIX = 0x0B
DWORD_PREFIX = 0x0C
STRING_PREFIX = 0x0D
QWORD_PREFIX = 0x0E
SCOPE_OP = 0x10
BUFFER_OP = 0x11
PACKAGE_OP = 0x12
METHOD_OP = 0x14
DUAL_NAME_PREFIX = 0x2E
MULTI_NAME_PREFIX = 0x2F
EXT_OP_PREFIX = 0x5B
ROOT_CHAR = 0x5C
PARENT_PREFIX_CHAR = 0x5E
LOCAL0_OP = 0x60
ARG0_OP = 0x68
STORE_OP = 0x70
AND_OP = 0x7B
OR_OP = 0x7D
NOTIFY_OP = 0x86
LAND_OP = 0x90
LOR_OP = 0x91
LNOT_OP = 0x92
LEQUAL_OP = 0x93
IF_OP = 0xA0
ELSE_OP = 0xA1
RETURN_OP = 0xA4
ONES_OP = 0xFF
# Extended opcodes follow EXT_OP_PREFIX.
OP_REGION_OP = 0x80
FIELD_OP = 0x81
DEVICE_OP = 0x82

NULL_NAME = 0x00

ZERO = Aml(bytes([ZERO_OP]))
ONE = Aml(bytes([ONE_OP]))
ONES = Aml(bytes([ONES_OP]))
"""All bits set: 0xFFFFFFFFFFFFFFFF in a revision-2 (64-bit integer) definition block."""

LOCAL0, LOCAL1, LOCAL2, LOCAL3, LOCAL4, LOCAL5, LOCAL6, LOCAL7 = (
    Aml(bytes([LOCAL0_OP + i])) for i in range(8)
)

PKG_LENGTH_MAX = (1 << 28) - 1
"""The largest value a PkgLength can carry (4 bytes: 4 + 3*8 bits)."""


def arg(index: int) -> Aml:
    """Method argument ``Arg0``..``Arg6``."""
    if not 0 <= index <= 6:
        raise AmlError(f"ArgX index {index} is not in 0..6", value=index)
    return Aml(bytes([ARG0_OP + index]))


def local(index: int) -> Aml:
    """Method local ``Local0``..``Local7``."""
    if not 0 <= index <= 7:
        raise AmlError(f"LocalX index {index} is not in 0..7", value=index)
    return Aml(bytes([LOCAL0_OP + index]))


# --- PkgLength -----------------------------------------------------------------------------------------------


def encode_pkg_length(value: int) -> bytes:
    """Encode ``value`` as a PkgLength field (1-4 bytes), without adding the field's own size.

    One byte holds 0..63 in bits 0-5. Longer forms put the count of following bytes (1-3) in bits 6-7 of
    the lead byte, the low nibble of the value in bits 0-3, and the rest little-endian in the following
    bytes. Field elements use this raw form for their bit widths.
    """
    if not 0 <= value <= PKG_LENGTH_MAX:
        raise AmlError(f"PkgLength value {value:#x} is not in 0..{PKG_LENGTH_MAX:#x}", value=value)
    if value < 0x40:
        return bytes([value])
    follow = 1 if value < (1 << 12) else 2 if value < (1 << 20) else 3
    rest = value >> 4
    return bytes([(follow << 6) | (value & 0x0F)]) + rest.to_bytes(follow, "little")


def pkg_length(body_length: int) -> bytes:
    """The PkgLength prefixing a body of ``body_length`` bytes: the encoded value counts its own bytes."""
    for size in (1, 2, 3, 4):
        total = body_length + size
        encoded = encode_pkg_length(total) if total <= PKG_LENGTH_MAX else b""
        if len(encoded) == size:
            return encoded
    raise AmlError(f"AML object of {body_length} bytes is too long for a PkgLength", value=body_length)


def _with_pkg_length(opcode: bytes, body: bytes) -> Aml:
    return Aml(opcode + pkg_length(len(body)) + body)


# --- Names ---------------------------------------------------------------------------------------------------

_NAME_SEG = re.compile(r"[A-Z_][A-Z0-9_]{0,3}")


def name_seg(segment: str) -> bytes:
    """One 4-character NameSeg; shorter names are padded with ``_`` as ASL does (``GED`` -> ``GED_``)."""
    if not _NAME_SEG.fullmatch(segment):
        raise AmlError(
            f"'{segment}' is not an AML NameSeg (1-4 of A-Z, 0-9, _; not starting with a digit)",
            value=segment,
        )
    return segment.ljust(4, "_").encode("ascii")


def name_string(path: str) -> Aml:
    """Encode a name path: optional root (``\\``) or parent (``^``...) prefix, then dot-separated segments.

    0 segments encode as NullName, 1 as a bare NameSeg, 2 with DualNamePrefix, 3-255 with
    MultiNamePrefix and a count.
    """
    prefix = b""
    rest = path
    if rest.startswith("\\"):
        prefix, rest = bytes([ROOT_CHAR]), rest[1:]
    else:
        while rest.startswith("^"):
            prefix, rest = prefix + bytes([PARENT_PREFIX_CHAR]), rest[1:]
    segments = rest.split(".") if rest else []
    encoded = [name_seg(s) for s in segments]
    if not encoded:
        if not prefix:
            raise AmlError("empty AML name path", value=path)
        return Aml(prefix + bytes([NULL_NAME]))
    if len(encoded) == 1:
        return Aml(prefix + encoded[0])
    if len(encoded) == 2:
        return Aml(prefix + bytes([DUAL_NAME_PREFIX]) + b"".join(encoded))
    if len(encoded) > 255:
        raise AmlError(f"AML name path with {len(encoded)} segments (max 255)", value=path)
    return Aml(prefix + bytes([MULTI_NAME_PREFIX, len(encoded)]) + b"".join(encoded))


def name_ref(path: str) -> Aml:
    """A reference to a named object used as an operand (``Store (ESEL, Local0)``)."""
    return name_string(path)


# --- Data objects --------------------------------------------------------------------------------------------


def integer(value: int) -> Aml:
    """The shortest encoding of ``value``: ZeroOp, OneOp, or Byte/Word/DWord/QWord prefix + little-endian."""
    if not 0 <= value < (1 << 64):
        raise AmlError(f"AML integer {value} is not in 0..2**64-1", value=value)
    if value == 0:
        return ZERO
    if value == 1:
        return ONE
    for prefix, width in ((BYTE_PREFIX, 1), (WORD_PREFIX, 2), (DWORD_PREFIX, 4), (QWORD_PREFIX, 8)):
        if value < (1 << (8 * width)):
            return Aml(bytes([prefix]) + value.to_bytes(width, "little"))
    raise AssertionError("unreachable")


def dword(value: int) -> Aml:
    """``value`` forced into the DWordPrefix form (EisaId and fixed-size fields use it)."""
    if not 0 <= value <= 0xFFFFFFFF:
        raise AmlError(f"AML DWord {value} is not in 0..0xFFFFFFFF", value=value)
    return Aml(bytes([DWORD_PREFIX]) + value.to_bytes(4, "little"))


def string(text: str) -> Aml:
    """A string literal: StringPrefix, ASCII characters 0x01-0x7F, NUL terminator."""
    try:
        data = text.encode("ascii")
    except UnicodeEncodeError as exc:
        raise AmlError(f"AML string {text!r} is not ASCII", value=text) from exc
    if 0 in data:
        raise AmlError(f"AML string {text!r} contains a NUL", value=text)
    return Aml(bytes([STRING_PREFIX]) + data + b"\x00")


def buffer(data: bytes) -> Aml:
    """``Buffer (n) { data }``: BufferOp PkgLength BufferSize(integer) bytes."""
    return _with_pkg_length(bytes([BUFFER_OP]), integer(len(data)) + bytes(data))


def value(item: Value) -> Aml:
    """Convert a value argument: Aml as is, int -> :func:`integer`, str -> :func:`string`."""
    if isinstance(item, Aml):
        return item
    if isinstance(item, bool):
        return ONE if item else ZERO
    if isinstance(item, int):
        return integer(item)
    if isinstance(item, str):
        return string(item)
    raise AmlError(f"cannot encode {type(item).__name__} as an AML value (wrap raw bytes in buffer())", value=item)


def operand(item: Operand) -> Aml:
    """Convert an expression operand: Aml as is, int -> :func:`integer`. Strings must be explicit."""
    if isinstance(item, Aml):
        return item
    if isinstance(item, int) and not isinstance(item, bool):
        return integer(item)
    raise AmlError(
        f"AML operand must be Aml or int, not {type(item).__name__} (use name_ref() or string())", value=item
    )


def package(*elements: Value) -> Aml:
    """``Package (n) { elements }`` with at most 255 elements (PackageOp PkgLength NumElements ...)."""
    if len(elements) > 255:
        raise AmlError(f"Package with {len(elements)} elements (max 255)", value=len(elements))
    body = bytes([len(elements)]) + b"".join(value(e) for e in elements)
    return _with_pkg_length(bytes([PACKAGE_OP]), body)


def eisaid_value(eisa_id: str) -> int:
    """Compress a 7-character PNP ID ("PNP0501") into its 32-bit EISA form (0x0105D041).

    The three letters take 5 bits each ('A' = 1) in a big-endian 16-bit word, followed by the four hex
    digits as a big-endian 16-bit word; the four bytes are then read as a little-endian DWORD.
    """
    if not re.fullmatch(r"[A-Z]{3}[0-9A-F]{4}", eisa_id):
        raise AmlError(f"'{eisa_id}' is not an EISA ID (3 capital letters then 4 hex digits)", value=eisa_id)
    letters = 0
    for char in eisa_id[:3]:
        letters = (letters << 5) | (ord(char) - 0x40)
    product = int(eisa_id[3:], 16)
    raw = letters.to_bytes(2, "big") + product.to_bytes(2, "big")
    return int.from_bytes(raw, "little")


def eisaid(eisa_id: str) -> Aml:
    """``EisaId ("PNP0501")`` as iasl emits it: always a DWordPrefix integer."""
    return dword(eisaid_value(eisa_id))


# --- Named objects and scopes ------------------------------------------------------------------------------


def _terms(terms: tuple[Aml, ...]) -> bytes:
    for term in terms:
        if not isinstance(term, Aml):
            raise AmlError(f"AML term list item is {type(term).__name__}, not Aml", value=term)
    return b"".join(terms)


def name(path: str, data: Value) -> Aml:
    """``Name (path, data)``."""
    return Aml(bytes([NAME_OP]) + name_string(path) + value(data))


def scope(path: str, *terms: Aml) -> Aml:
    """``Scope (path) { terms }``."""
    return _with_pkg_length(bytes([SCOPE_OP]), name_string(path) + _terms(terms))


def device(path: str, *terms: Aml) -> Aml:
    """``Device (path) { terms }``."""
    return _with_pkg_length(bytes([EXT_OP_PREFIX, DEVICE_OP]), name_string(path) + _terms(terms))


def method(path: str, arg_count: int, *terms: Aml, serialized: bool = False, sync_level: int = 0) -> Aml:
    """``Method (path, arg_count, Serialized|NotSerialized, sync_level) { terms }``.

    MethodFlags: bits 0-2 argument count, bit 3 serialized, bits 4-7 sync level.
    """
    if not 0 <= arg_count <= 7:
        raise AmlError(f"Method {path} with {arg_count} arguments (max 7)", value=arg_count)
    if not 0 <= sync_level <= 15:
        raise AmlError(f"Method {path} sync level {sync_level} is not in 0..15", value=sync_level)
    flags = arg_count | (0x08 if serialized else 0) | (sync_level << 4)
    return _with_pkg_length(bytes([METHOD_OP]), name_string(path) + bytes([flags]) + _terms(terms))


# --- Operation regions and fields ----------------------------------------------------------------------------


class RegionSpace(enum.IntEnum):
    """Operation region address spaces (RegionSpace byte)."""

    SYSTEM_MEMORY = 0x00
    SYSTEM_IO = 0x01
    PCI_CONFIG = 0x02


class AccessType(enum.IntEnum):
    """Field access width (FieldFlags bits 0-3)."""

    ANY = 0
    BYTE = 1
    WORD = 2
    DWORD = 3
    QWORD = 4
    BUFFER = 5


class UpdateRule(enum.IntEnum):
    """What a write does to the bits of an access unit outside the field (FieldFlags bits 5-6)."""

    PRESERVE = 0
    WRITE_AS_ONES = 1
    WRITE_AS_ZEROS = 2


def operation_region(path: str, space: RegionSpace, offset: Operand, length: Operand) -> Aml:
    """``OperationRegion (path, space, offset, length)``."""
    return Aml(
        bytes([EXT_OP_PREFIX, OP_REGION_OP])
        + name_string(path)
        + bytes([int(space)])
        + operand(offset)
        + operand(length)
    )


@dataclass(frozen=True)
class FieldUnit:
    """A named field of ``bits`` bits at the current position (``ESEL, 32``)."""

    name: str
    bits: int


@dataclass(frozen=True)
class FieldOffset:
    """``Offset (byte)``: skip forward to a byte offset in the region (encoded as a reserved field)."""

    byte: int


@dataclass(frozen=True)
class FieldReserved:
    """``, bits``: an unnamed gap of ``bits`` bits."""

    bits: int


FieldElement = Union[FieldUnit, FieldOffset, FieldReserved]


def field(
    region: str,
    *elements: FieldElement,
    access: AccessType = AccessType.ANY,
    lock: bool = False,
    update: UpdateRule = UpdateRule.PRESERVE,
) -> Aml:
    """``Field (region, access, Lock|NoLock, update) { elements }``.

    A named field is its NameSeg followed by its width in bits as a raw PkgLength; a gap is a zero byte
    followed by the width. ``Offset`` is turned into the gap that reaches it, so offsets must not go back.
    """
    flags = int(access) | (0x10 if lock else 0) | (int(update) << 5)
    body = bytearray(name_string(region) + bytes([flags]))
    position = 0
    for element in elements:
        if isinstance(element, FieldOffset):
            gap = element.byte * 8 - position
            if gap < 0:
                raise AmlError(
                    f"Field {region}: Offset ({element.byte:#x}) is behind bit position {position}", value=element
                )
            if gap:
                body += bytes([NULL_NAME]) + encode_pkg_length(gap)
            position += gap
        elif isinstance(element, FieldReserved):
            if element.bits <= 0:
                raise AmlError(f"Field {region}: reserved gap of {element.bits} bits", value=element)
            body += bytes([NULL_NAME]) + encode_pkg_length(element.bits)
            position += element.bits
        elif isinstance(element, FieldUnit):
            if element.bits <= 0:
                raise AmlError(f"Field {region}: {element.name} has {element.bits} bits", value=element)
            body += name_seg(element.name) + encode_pkg_length(element.bits)
            position += element.bits
        else:
            raise AmlError(f"Field {region}: unknown element {element!r}", value=element)
    return _with_pkg_length(bytes([EXT_OP_PREFIX, FIELD_OP]), bytes(body))


# --- Statements and expressions ------------------------------------------------------------------------------


def _target(target: Aml | str | None) -> Aml:
    if target is None:
        return Aml(bytes([NULL_NAME]))
    if isinstance(target, str):
        return name_string(target)
    return target


def store(source: Operand, target: Aml | str) -> Aml:
    """``Store (source, target)`` (ASL+: ``target = source``)."""
    return Aml(bytes([STORE_OP]) + operand(source) + _target(target))


def return_(result: Operand) -> Aml:
    """``Return (result)``."""
    return Aml(bytes([RETURN_OP]) + operand(result))


def if_(predicate: Operand, *terms: Aml) -> Aml:
    """``If (predicate) { terms }``."""
    return _with_pkg_length(bytes([IF_OP]), operand(predicate) + _terms(terms))


def else_(*terms: Aml) -> Aml:
    """``Else { terms }``; place it right after the :func:`if_` it belongs to."""
    return _with_pkg_length(bytes([ELSE_OP]), _terms(terms))


def lequal(left: Operand, right: Operand) -> Aml:
    """``LEqual (left, right)`` (ASL+: ``left == right``)."""
    return Aml(bytes([LEQUAL_OP]) + operand(left) + operand(right))


def land(left: Operand, right: Operand) -> Aml:
    """``LAnd (left, right)``."""
    return Aml(bytes([LAND_OP]) + operand(left) + operand(right))


def lnot(item: Operand) -> Aml:
    """``LNot (item)``."""
    return Aml(bytes([LNOT_OP]) + operand(item))


def and_(left: Operand, right: Operand, target: Aml | str | None = None) -> Aml:
    """``And (left, right, target)``; without a target the result is only returned."""
    return Aml(bytes([AND_OP]) + operand(left) + operand(right) + _target(target))


def or_(left: Operand, right: Operand, target: Aml | str | None = None) -> Aml:
    """``Or (left, right, target)``; without a target the result is only returned."""
    return Aml(bytes([OR_OP]) + operand(left) + operand(right) + _target(target))


def notify(target: Aml | str, code: Operand) -> Aml:
    """``Notify (target, code)``: e.g. 0x80 on a power button device reports a press."""
    return Aml(bytes([NOTIFY_OP]) + _target(target) + operand(code))

