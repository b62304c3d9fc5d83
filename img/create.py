"""``pyemu-img create [-q] [-f fmt] [-o options] [-b backing [-F backing_fmt]] [-u] filename [size]``.

Creates a raw or qcow2 image through the block layer. As qemu-img: the size may come from the command line
or ``-o size=``, but not both; with a backing file and no size the image takes the backing file's size
(``-u`` skips opening the backing file, so a size is then required); a backing file needs its format
(``-F``); the "Formatting ..." line is printed before the image is written, so its fields are exactly what
was asked for.
"""

from __future__ import annotations

import os
import sys

from pyemu.img.createopts import CREATE_OPTIONS, OptionSet, formatting_line, help_text, wants_help
from pyemu.img.errors import ImgError, UsageError
from pyemu.img.getopts import OptionSpec, parse
from pyemu.img.images import check_format, close_quietly, create_image, open_image, probe_format, resolve_backing
from pyemu.img.sizes import parse_image_size

SPEC = OptionSpec("F:b:f:ho:qu")


def round_up(value: int, align: int) -> int:
    return -(-value // align) * align


def run(argv: list[str]) -> int:
    p = parse(argv, SPEC)
    fmt = check_format(p.last("-f", default="raw"))
    assert fmt is not None
    option_strings = p.all("-o")
    if wants_help(option_strings):
        print(help_text(fmt, CREATE_OPTIONS[fmt]))
        return 0
    if not p.args:
        raise UsageError("Expecting image file name")
    if len(p.args) > 2:
        raise UsageError(f"Unexpected argument: {p.args[2]}")
    filename = p.args[0]
    quiet = p.has("-q")
    unsafe = p.has("-u")

    try:
        options = OptionSet(CREATE_OPTIONS[fmt], option_strings)
    except ImgError as exc:
        raise ImgError(f"{filename}: {exc}") from None
    size: int | None = None
    if len(p.args) == 2:
        size = parse_image_size(p.args[1])
        if "size" in options:
            raise ImgError(f"{filename}: The image size must be specified only once")
    elif "size" in options:
        size = options.get_int("size", 0)

    backing = p.last("-b")
    backing_fmt = p.last("-F")
    if fmt == "raw" and (backing is not None or backing_fmt is not None):
        raise ImgError(f"{filename}: Backing file not supported for file format 'raw'")
    if backing is not None:
        options.set("backing_file", backing)
    if backing_fmt is not None:
        options.set("backing_fmt", backing_fmt)
    backing = str(options.get("backing_file")) if "backing_file" in options else None
    backing_fmt = str(options.get("backing_fmt")) if "backing_fmt" in options else None
    if backing == "":
        backing = None
    if backing_fmt is not None and backing is None:
        raise ImgError(f"{filename}: Backing format cannot be used without backing file")
    if backing is not None:
        size = _check_backing(filename, backing, backing_fmt, size, unsafe)
    if size is None:
        raise ImgError(f"{filename}: Image creation needs a size parameter")

    if not quiet:
        print(formatting_line(filename, fmt, options, size))
        sys.stdout.flush()
    if fmt == "qcow2":
        compression = options.get("compression_type", "zlib")
        if compression != "zlib":
            raise ImgError(f"{filename}: Compression type '{compression}' is not supported (only zlib)")
        size = round_up(size, 512)
    values = dict(options.values)
    values.pop("size", None)
    values.pop("compression_type", None)
    create_image(filename, fmt, size, options=values)
    return 0


def _check_backing(filename: str, backing: str, backing_fmt: str | None, size: int | None, unsafe: bool) -> int | None:
    """Validate the backing file (unless ``-u``) and return the image size (the backing size by default)."""
    path = resolve_backing(filename, backing)
    if os.path.exists(filename) and os.path.exists(path) and os.path.samefile(path, filename):
        raise ImgError(f"{filename}: Error: Trying to create an image with the same filename as the backing file")
    if backing_fmt is None:
        hint = ""
        if not unsafe:
            try:
                hint = f" (detected format of {probe_format(path)})"
            except ImgError:
                pass
        raise ImgError(f"{filename}: Backing file specified without backing format{hint}")
    check_format(backing_fmt)
    if unsafe:
        return size
    try:
        node = open_image(path, fmt=backing_fmt, backing=True)
    except ImgError as exc:
        raise ImgError(f"{filename}: {exc.__cause__ or exc} (could not open backing image)") from None
    try:
        return node.size() if size is None else size
    finally:
        close_quietly(node)
