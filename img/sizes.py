"""Size arguments ("1G", "512k", "1.5M", "0x1000") and human-readable sizes ("196 KiB"), as qemu-img has them.

qemu-img accepts one integer (decimal, or hex with ``0x``) with an optional decimal fraction and an optional
binary suffix (b, k, M, G, T, P, E; case-insensitive); a fraction needs a real multiplier ("1.5M" is fine,
"1.5" is not), the fractional bytes are rounded to the nearest byte, and the result must fit in a signed
64-bit integer. Scripts pass these strings unchanged to both tools, so the same strings must mean the same
sizes here -- including the odd corners (leading blanks and "+" are accepted, a trailing blank is not).
"""

from __future__ import annotations

import math
import sys

from pyemu.img.errors import ImgError

INT64_MAX = (1 << 63) - 1

_SHIFTS = {"b": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}
_SPACE = " \t\n\v\f\r"
_HEX = "0123456789abcdefABCDEF"
_UNITS = ("", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei")

SUFFIX_HINT = ("You may use k, M, G, T, P or E suffixes for kilobytes, megabytes, gigabytes, terabytes, "
               "petabytes and exabytes.")


class SizeSyntaxError(ImgError):
    """The text is not a size at all."""


class SizeRangeError(ImgError):
    """The text is a size, but larger than a signed 64-bit integer."""


def parse_size(text: str, *, warn: bool = True) -> int:
    """The number of bytes ``text`` names. Raises SizeSyntaxError or SizeRangeError (message: the reason)."""
    pos = 0
    n = len(text)
    while pos < n and text[pos] in _SPACE:
        pos += 1
    if pos < n and text[pos] == "+":
        pos += 1
    is_hex = text[pos:pos + 2] in ("0x", "0X")
    if is_hex:
        start = pos + 2
        pos = start
        while pos < n and text[pos] in _HEX:
            pos += 1
        digits = text[start:pos]
        if not digits:
            raise SizeSyntaxError("not a number")
        value = int(digits, 16)
    else:
        start = pos
        while pos < n and text[pos].isascii() and text[pos].isdigit():
            pos += 1
        if pos == start:
            raise SizeSyntaxError("not a number")
        value = int(text[start:pos])
    fraction = 0.0
    if not is_hex and pos < n and text[pos] == ".":
        pos += 1
        start = pos
        while pos < n and text[pos].isascii() and text[pos].isdigit():
            pos += 1
        if pos > start:
            fraction = float("0." + text[start:pos])
            if fraction >= 1.0:
                # So many nines that the double rounds to 1: qemu-img then drops the fraction entirely.
                fraction = 0.0
    shift = 0
    has_suffix = False
    if pos < n and text[pos].lower() in _SHIFTS:
        shift = _SHIFTS[text[pos].lower()]
        has_suffix = True
        pos += 1
    if pos != n:
        raise SizeSyntaxError("trailing characters")
    if fraction and shift == 0:
        raise SizeSyntaxError("a fraction needs a k, M, G, T, P or E suffix")
    if is_hex and has_suffix and warn:
        print(f"pyemu-img: warning: Using a multiplier suffix on hex numbers is deprecated: {text}",
              file=sys.stderr)
    multiplier = 1 << shift
    result = value * multiplier + math.floor(fraction * multiplier + 0.5)
    if value > (1 << 64) - 1 or result > INT64_MAX:
        raise SizeRangeError("too large")
    return result


def parse_image_size(text: str, *, what: str = "image size") -> int:
    """A size argument with qemu-img's error messages ("Invalid image size specified. ...")."""
    try:
        return parse_size(text)
    except SizeRangeError:
        raise ImgError(f"Invalid {what} specified. Must be between 0 and {INT64_MAX}.") from None
    except SizeSyntaxError:
        raise ImgError(f"Invalid {what} specified. {SUFFIX_HINT}") from None


def format_size(value: int) -> str:
    """qemu-img's human size ("0 B", "196 KiB", "1.27 MiB"): three significant digits, and the next unit
    as soon as the number would print as 1000 or more."""
    if value <= 0:
        return f"{value} B" if value < 0 else "0 B"
    _, exponent = math.frexp(value / (1000.0 / 1024.0))
    index = min(max(int((exponent - 1) / 10), 0), len(_UNITS) - 1)
    return f"{value / (1 << (10 * index)):0.3g} {_UNITS[index]}B"
