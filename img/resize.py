"""``pyemu-img resize [-f fmt] [--preallocation=mode] [-q] [--shrink] filename [+|-]size``.

As in qemu-img the size is always the *last* argument and is taken off the command line before the options
are parsed, so ``resize disk.img -1G`` shrinks instead of complaining about an option ``-1``. A leading
``+``/``-`` makes it relative to the current size. Shrinking needs ``--shrink`` (data past the new end is
lost). qcow2 images are resized by their driver; raw images by truncating the file (with ``falloc``/``full``
preallocation of a grown tail if asked).
"""

from __future__ import annotations

import errno
import os

from pyemu.block.errors import BlockError
from pyemu.block.image import preallocate_file
from pyemu.img.errors import ImgError, UsageError
from pyemu.img.getopts import OptionSpec, parse
from pyemu.img.images import as_qcow2, check_format, close_checked, close_quietly, open_image
from pyemu.img.sizes import SizeRangeError, SizeSyntaxError, parse_size

SPEC = OptionSpec("f:hqU", ("shrink", "preallocation="))
PREALLOCATION = ("off", "metadata", "falloc", "full")
SIZE_ERROR = ("Parameter 'size' expects a non-negative number below 2^64 (optional suffix k, M, G, T, P or E "
              "means kilo-, mega-, giga-, tera-, peta- and exabytes)")


def new_size(text: str, current: int) -> int:
    sign = 0
    if text[:1] == "+":
        sign, text = 1, text[1:]
    elif text[:1] == "-":
        sign, text = -1, text[1:]
    if text[:1] in ("+", "-"):
        raise ImgError(SIZE_ERROR)
    try:
        value = parse_size(text)
    except (SizeSyntaxError, SizeRangeError):
        raise ImgError(SIZE_ERROR) from None
    result = current + sign * value if sign else value
    if result <= 0:
        raise ImgError("New image size must be positive")
    return result


def run(argv: list[str]) -> int:
    if len(argv) < 2:
        raise UsageError("Not enough arguments")
    size_text = argv[-1]
    p = parse(argv[:-1], SPEC)
    if len(p.args) != 1:
        raise UsageError("Expecting one image file name")
    filename = p.args[0]
    fmt = check_format(p.last("-f"))
    prealloc = p.last("--preallocation", default="off")
    if prealloc not in PREALLOCATION:
        raise ImgError(f"Invalid preallocation mode: '{prealloc}'")
    shrink = p.has("--shrink")
    if p.has("-U"):
        raise ImgError(f"Could not open '{filename}': force-share=on can only be used with read-only images")
    node = open_image(filename, fmt=fmt, writable=True, resize=True)
    try:
        current = node.size()
        size = new_size(size_text, current)
        if size < current and not shrink:
            raise ImgError("Use the --shrink option to perform a shrink operation.")
        image = as_qcow2(node)
        if image is not None:
            if prealloc != "off":
                raise ImgError(f"Preallocation mode '{prealloc}' is not supported when resizing qcow2 images")
            try:
                image.truncate(size, shrink=shrink)
            except BlockError as exc:
                raise ImgError(str(exc)) from exc
        else:
            if prealloc == "metadata":
                raise ImgError("Preallocation mode 'metadata' is not supported for raw images")
            _resize_raw(node.filename, current, size, prealloc)
    except BaseException:
        close_quietly(node)
        raise
    close_checked(node, filename)
    if not p.has("-q"):
        print("Image resized.")
    return 0


def _resize_raw(path: str, current: int, size: int, prealloc: str) -> None:
    """Truncate the file; the image stays open (and locked with the resize permission) meanwhile."""
    try:
        with open(path, "r+b", buffering=0) as f:
            os.ftruncate(f.fileno(), size)
            preallocate_file(f.fileno(), current, size, prealloc)
            os.fsync(f.fileno())
    except OSError as exc:
        raise ImgError(f"Could not resize '{path}': {os.strerror(exc.errno or errno.EIO)}") from exc
